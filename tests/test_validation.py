"""chat_ui.validation: every input checked for type, finiteness and length, in linear time;
and the handlers that use it keep a session working after any refused input."""

from __future__ import annotations

import math
import re
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chat_ui import validation
from chat_ui.handlers import ChatService
from chat_ui.validation import InputError
from rlhf_core.feedback import FeedbackStore
from rlhf_core.redis_server import connect
from rlhf_core.serving import PolicyServer
from rlhf_core.settings import Settings

OLD_FOOTER_RE = re.compile(r"\s*<sub>written by v\d+[^<]*</sub>\s*$")
S = Settings()


@pytest.mark.parametrize(
    "value, message",
    [
        (math.nan, "finite"),
        ("nan", "finite"),
        (math.inf, "finite"),
        ("-inf", "finite"),
        (10**400, "finite"),
        (True, "not true/false"),
        ([1], "must be a number"),
        ({"a": 1}, "must be a number"),
        ("abc", "must be a number"),
        ("1" * 40, "characters of text"),
        (2.5, "at most 2"),
        (-0.1, "at least 0"),
        (1.39e-182, "0 .always the likeliest word. or between 0.01"),  # found by test_fuzz
    ],
)
def test_bad_temperatures_are_refused_with_what_to_do(value, message):
    with pytest.raises(InputError, match=message):
        validation.sampling(value, 0.9, 8, S)


def test_sampling_defaults_ranges_and_whole_numbers():
    assert validation.sampling(None, "", None, S) == {
        "temperature": S.temperature, "top_p": S.top_p, "max_new_tokens": S.max_new_tokens
    }  # fmt: skip
    assert validation.sampling("0.5", 1, 8.0, S) == {
        "temperature": 0.5, "top_p": 1.0, "max_new_tokens": 8
    }  # fmt: skip
    with pytest.raises(InputError, match="above 0"):
        validation.sampling(0.5, 0, 8, S)
    with pytest.raises(InputError, match="whole number"):
        validation.sampling(0.5, 0.9, 8.5, S)
    with pytest.raises(InputError, match="at most 1024"):
        validation.sampling(0.5, 0.9, 10**6, S)
    with pytest.raises(InputError, match="Unknown sampling settings: seed"):
        validation.sampling_dict({"seed": 1}, S)


def test_indexes_versions_votes_session_ids():
    assert validation.answer_index("-1") == -1 and validation.answer_index([3, 0]) == 3
    for bad in (None, "x", 1.5, math.inf, 10**12, True):
        with pytest.raises(InputError):
            validation.answer_index(bad)
    assert validation.version("2") == 2 and validation.version(3.0) == 3
    with pytest.raises(InputError, match="finite"):
        validation.version("inf")  # rollback("inf") was an uncaught OverflowError
    with pytest.raises(InputError, match="at least 0"):
        validation.version(-1)
    assert validation.vote_kind("none") == "unvote" and validation.vote_kind(None) == "unvote"
    for bad in ("LIKE", 1, "x" * 1000):
        with pytest.raises(InputError, match="use 'like'"):
            validation.vote_kind(bad)
    for bad in ("", " ", None, "a\ud800b", "a\nb", "x" * 300, 7):  # " ": found by test_fuzz
        with pytest.raises(InputError, match="reload the page"):
            validation.session_id(bad)


def test_texts_type_length_and_surrogates():
    assert validation.message("  hi \ud800 ", S) == "hi \ufffd"
    for bad, message in ((None, "Type a message"), (3, "must be text"), (["a"], "must be text")):
        with pytest.raises(InputError, match=message):
            validation.message(bad, S)
    with pytest.raises(InputError, match="limit is 4,000"):
        validation.message("x" * 4001, S)
    assert validation.system_prompt(None, S) is None and validation.system_prompt(" ", S) == ""
    with pytest.raises(InputError, match="system prompt"):
        validation.system_prompt("x" * 5000, S)
    assert validation.edited_text([{"text": "a"}, "b"]) == "ab"
    with pytest.raises(InputError, match="must be text"):
        validation.edited_text([{"text": 1}])


@settings(max_examples=300, deadline=None)
@given(
    st.text(alphabet=st.sampled_from(" \t\n<>/subwritenbyv0123456789·x"), max_size=60),
    st.sampled_from(["", " ", "\n\n", "  \t"]),
)
def test_strip_footer_equals_the_old_regex(text, tail):
    value = text + tail
    assert validation.strip_footer(value).strip() == OLD_FOOTER_RE.sub("", value).strip()


def test_strip_footer_examples():
    assert validation.strip_footer("Paris.\n\n<sub>written by v3 · edited by you</sub>") == "Paris."
    assert validation.strip_footer("a <sub>written by vX</sub>") == "a <sub>written by vX</sub>"


def test_a_megabyte_of_blanks_is_handled_at_once():
    """The footer regex took ~6.6 s on 40,000 blanks (quadratic); 1 MB was about an hour."""
    for text in (" " * 1_000_000, " " * 1_000_000 + "</sub>", "<sub>written by v1" * 50_000):
        start = time.perf_counter()
        try:
            validation.rewrite(text, S, original_chars=10)
        except InputError:
            pass
        assert time.perf_counter() - start < 0.5


# --- through the handlers ------------------------------------------------------------------
@pytest.fixture()
def service(tiny_settings, tiny_model):
    store = FeedbackStore(connect(tiny_settings))
    return ChatService(tiny_settings, PolicyServer(tiny_model, tiny_settings), store)


def answer(service, session="s1", text="Hi"):
    *_, final = service.send(session, text, None, {"max_new_tokens": 4})
    return final


def test_nan_sampling_and_odd_session_ids_leave_sessions_working(service):
    """A NaN temperature used to be stored in a pending turn that could never be saved,
    and every later call of that session failed."""
    with pytest.raises(InputError, match="finite"):
        list(service.send("s1", "Hi", None, {"temperature": math.nan}))
    with pytest.raises(InputError, match="reload the page"):
        list(service.send("s\ud800", "Hi"))
    final = answer(service)
    assert final.messages[-1]["saved"]
    assert service.vote("s1", -1, "like").messages[-1]["vote"] == "like"
    with pytest.raises(InputError, match="finite"):
        list(service.regenerate("s1", -1, {"top_p": math.inf}))
    counts = service.store.counts()
    assert (counts["turns"], counts["events"], counts["unconsumed"]) == (1, 1, 1)


def test_megabyte_blank_rewrite_returns_at_once(service):
    answer(service)
    start = time.perf_counter()
    with pytest.raises(InputError, match="limit is"):
        service.rewrite("s1", -1, " " * 1_000_000 + "x" * 5000 + " " * 1000)
    with pytest.raises(InputError, match="cannot be empty"):
        service.rewrite("s1", -1, " " * 1_000_000)
    assert time.perf_counter() - start < 1.0
    assert service.store.counts()["events"] == 0


def test_failed_regenerate_leaves_no_event(service, monkeypatch):
    """Regenerate recorded its event before generating: a failed generation left a stray
    event, and a later Undo retracted it instead of the vote the person saw."""
    answer(service)
    service.vote("s1", -1, "like")

    def broken(*args, **kwargs):
        raise RuntimeError("generation failed")

    monkeypatch.setattr(service.policy, "stream", broken)
    with pytest.raises(RuntimeError):
        list(service.regenerate("s1", -1))
    monkeypatch.undo()
    kinds = [e.kind for e in service.store.events()]
    assert kinds == ["like"]
    service.undo("s1")  # takes back the vote the person sees
    assert [e.kind for e in service.store.events()] == ["like", "undo"]
    assert service.view(service.session("s1"))[-1]["vote"] is None
    # A regenerate that works records its event with the new answer.
    *_, final = service.regenerate("s1", -1, {"max_new_tokens": 4})
    assert [e.kind for e in service.store.events()][-1] == "regenerate"
    assert final.messages[-1]["turn_id"] != kinds and final.messages[-1]["saved"]


def test_vote_while_streaming_is_applied_when_the_answer_is_stored(service):
    """A 👍 on the answer still streaming got an error; now it counts once stored."""
    stream = service.send("s1", "Hi", None, {"max_new_tokens": 4})
    first = next(stream)
    assert not first.done
    pending = service.vote("s1", -1, "like")
    assert not pending.done and service.feedback_state("s1") == ["like"]
    assert service.store.counts()["events"] == 0  # nothing without its answer
    *_, final = stream
    assert final.messages[-1]["vote"] == "like"
    (event,) = service.store.events()
    assert event.kind == "like" and event.turn_id == final.messages[-1]["turn_id"]
    service.undo("s1")
    assert service.feedback_state("s1") == [None]


def test_idle_sessions_expire_after_their_answers_are_saved(tiny_settings, tiny_model, valkey):
    """Sessions were kept until 10,000 existed, then the oldest was dropped with its
    pending answer. Now they expire by time, and only once their answers are stored."""
    settings = tiny_settings.model_copy(update={"session_idle_s": 0.3, "redis_timeout_s": 0.5})
    store = FeedbackStore(connect(settings))
    service = ChatService(settings, PolicyServer(tiny_model, settings), store)
    service._sweep_every = 1e9  # sweeps only when this test calls expire_idle
    answer(service, "kept")
    valkey.kill()  # the store goes away: the next answer stays pending in its session
    final = answer(service, "pending")
    assert not final.messages[-1]["saved"]
    time.sleep(0.4)
    assert service.expire_idle() == 1  # "kept" goes; "pending" must wait for the store
    assert set(service._sessions) == {"pending"}
    valkey.start()
    assert service.expire_idle() == 1 and not service._sessions
    assert {t.session_id for t in store.turns()} == {"kept", "pending"}


def test_the_page_shows_each_message_with_its_own_whitespace():
    """Gradio passes a plain-string message through ``inspect.cleandoc``: tabs became
    spaces and the indentation shared by the lines after the first was stripped, so the
    page showed other text than the store holds (the fuzz test caught an answer with tabs)
    and a code answer lost its indentation. Each text now goes as a text part."""
    import gradio as gr

    from chat_ui.app import chat_messages

    answer = "Here:\n    def f():\n\treturn 1"
    question = "  an indented\n  question"
    shown = gr.Chatbot().postprocess(
        chat_messages([
            {"role": "user", "content": question},
            {"role": "assistant", "content": answer, "turn_id": "t", "version": 1},
        ])
    ).model_dump()  # fmt: skip
    texts = [m["content"][0]["text"] for m in shown]
    assert texts[0] == question
    assert texts[1].startswith(answer + "\n\n<sub>written by v1")
