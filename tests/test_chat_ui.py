"""The chat UI: handlers on their own, then the real Gradio app on a free port driven
through gradio_client, with the records checked in a real Valkey server."""

from __future__ import annotations

import pytest
from gradio_client import Client
from gradio_client.exceptions import AppError

from chat_ui.handlers import ChatService, InputError
from rlhf_core.datasets import resolve_events
from rlhf_core.feedback import FeedbackStore
from rlhf_core.redis_server import connect
from rlhf_core.serving import PolicyServer

SAMPLING = (1.0, 0.9, 8)  # temperature, top_p, max_new_tokens: short answers, fast tests


# --- handlers, without a browser ------------------------------------------------------
@pytest.fixture()
def service(tiny_settings, tiny_model):
    store = FeedbackStore(connect(tiny_settings))
    return ChatService(tiny_settings, PolicyServer(tiny_model, tiny_settings), store)


def last(updates):
    out = list(updates)
    assert out and out[-1].done
    return out


def test_send_writes_turn_before_final_update(service):
    seen_before_final = []
    for update in service.send("s1", "Hello there", "Be brief.", {"max_new_tokens": 6}):
        if update.done:
            turn_id = update.messages[-1]["turn_id"]
            # The final update is produced after the turn is in Redis.
            seen_before_final.append(service.store.get_turn(turn_id))
    (turn,) = seen_before_final
    assert turn is not None and turn.session_id == "s1"
    assert turn.messages[0] == {"role": "system", "content": "Be brief."}
    assert turn.messages[-1] == {"role": "user", "content": "Hello there"}
    assert turn.sampling["max_new_tokens"] == 6 and turn.policy_version == 0


def test_saved_turn_says_whether_the_answer_ended_with_eos(service):
    """Issue 9, defect 3: a random model's 4-token answer is cut (no EOS), and the
    stored turn says so; forcing EOS at the first step gives a finished turn."""
    eos = service.policy.tokenizer.eos_token_id

    def run(force_eos: bool):
        def steer(_module, _inputs, logits):
            logits = logits.clone()
            logits[..., eos] = 1e4 if force_eos else -1e4
            return logits

        head = service.policy.model.get_output_embeddings()
        hook = head.register_forward_hook(steer)
        try:
            updates = last(service.send("s1", "Hello", None, {"max_new_tokens": 4}))
        finally:
            hook.remove()
        return service.store.get_turn(updates[-1].messages[-1]["turn_id"])

    assert run(force_eos=False).finished is False
    assert run(force_eos=True).finished is True


def test_bad_input_is_refused_with_a_clear_message(service):
    with pytest.raises(InputError, match="empty message"):
        list(service.send("s1", "   \n"))
    with pytest.raises(InputError, match="limit is"):
        list(service.send("s1", "x" * (service.settings.max_input_chars + 1)))
    with pytest.raises(InputError, match="not a finished answer"):
        service.vote("s1", 0, "like")
    assert service.store.counts()["turns"] == 0


def test_a_rewrite_may_grow_to_four_times_the_answer_not_the_last_rewrite(service):
    # Review s11: the limit was four times the text being replaced, so each rewrite of the
    # same answer could be four times the last one (400 -> 1,600 -> 6,400 ... characters).
    service.settings = service.settings.model_copy(update={"max_input_chars": 400})
    answer = last(service.send("s1", "Hello", None, {"max_new_tokens": 4}))[-1].messages[-1]
    assert 4 * len(answer["content"]) < 400
    service.rewrite("s1", -1, "a" * 400)
    with pytest.raises(InputError, match="the limit is 400"):
        service.rewrite("s1", -1, "b" * 1600)
    assert service.view(service.session("s1"))[-1]["content"] == "a" * 400


def test_an_empty_answer_saved_unchanged_in_the_editor_is_no_rewrite(service):
    # Review of s26: the page shows an empty answer as a placeholder, and the editor starts
    # from what the page shows. Saved unchanged, the placeholder was recorded as the
    # person's rewrite: a pair preferring the UI's own words, imitated by the next round.
    from chat_ui.app import chat_messages

    eos = service.policy.tokenizer.eos_token_id

    def stop_at_once(_module, _inputs, logits):
        logits = logits.clone()
        logits[..., eos] = 1e4
        return logits

    hook = service.policy.model.get_output_embeddings().register_forward_hook(stop_at_once)
    try:
        last(service.send("s1", "Hello", None, {"max_new_tokens": 4}))
    finally:
        hook.remove()
    assert service.view(service.session("s1"))[-1]["content"] == ""
    shown = chat_messages(service.view(service.session("s1")))[-1]["content"]["text"]
    update = service.rewrite("s1", -1, shown)
    assert update.messages[-1]["content"] == "" and not update.messages[-1]["rewritten"]
    assert [e.kind for e in service.store.events()] == []
    service.rewrite("s1", -1, "Hi!")  # an edit of it is a rewrite as any other
    assert [e.text for e in service.store.events()] == ["Hi!"]


def test_a_vote_on_an_edited_answer_is_not_a_vote_on_the_served_one(service, tiny_settings):
    # Review of s26: after an edit the page shows the person's text, and 👍 on it says
    # that text is good. It was recorded as a 👍 of the answer the model wrote: a liked
    # pointwise example of the answer the person rewrote, and the chosen side of a vote
    # pair against the answers they disliked, next to the pair that says it is worse.
    from rlhf_core import datasets as ds

    last(service.send("s1", "Name a colour", None, {"max_new_tokens": 4}))
    served = service.store.get_turn(service.view(service.session("s1"))[-1]["turn_id"])
    service.vote("s1", -1, "dislike")
    service.rewrite("s1", -1, "Blue.")
    service.vote("s1", -1, "like")  # the page shows "Blue." now
    (row,) = ds.export_rows(service.store, "kto", settings=tiny_settings)
    assert row["completion"][0]["content"] == served.answer
    assert row["label"] is False  # the 👎 given to what the model wrote stands
    (pair,) = ds.export_rows(service.store, "dpo", settings=tiny_settings)
    assert pair["chosen"][0]["content"] == "Blue."
    # Undone, the edit is gone, and a vote is on the served answer again.
    service.undo("s1")
    service.undo("s1")
    service.vote("s1", -1, "like")
    (row,) = ds.export_rows(service.store, "kto", settings=tiny_settings)
    assert row["label"] is True


def test_one_answer_takes_a_bounded_number_of_reactions_and_undo_a_bounded_stack(service):
    # Review s23: a script alternating two 4,000-character rewrites of one answer (240 a
    # minute per address) grew the session's undo stack, each entry keeping the text it
    # replaced, and the store's events of that turn, without end.
    from chat_ui.handlers import MAX_REACTIONS_PER_ANSWER, UNDO_DEPTH

    answer = last(service.send("s1", "Hello", None, {"max_new_tokens": 4}))[-1].messages[-1]
    session = service.session("s1")
    for i in range(MAX_REACTIONS_PER_ANSWER):
        service.rewrite("s1", -1, ("a" if i % 2 else "b") * 4000)
    assert len(session.actions) == UNDO_DEPTH == 50  # the send fell off the bottom
    with pytest.raises(InputError, match="taken 50 reactions.*Send a new message"):
        service.rewrite("s1", -1, "c" * 4000)
    with pytest.raises(InputError, match="taken 50 reactions"):
        service.vote("s1", -1, "like")
    events = [e for e in service.store.events() if e.turn_id == answer["turn_id"]]
    assert len(events) == MAX_REACTIONS_PER_ANSWER
    # Undo still takes back what the stack holds (the last rewrite, "a"s), and records it.
    service.undo("s1")
    assert service.view(session)[-1]["content"] == "b" * 4000
    assert len(session.actions) == UNDO_DEPTH - 1
    assert sum(e.kind == "undo" for e in service.store.events()) == 1
    # A regenerate of that answer is recorded with its new answer, which takes reactions anew.
    last(service.regenerate("s1", -1, {"max_new_tokens": 4}))
    assert sum(e.kind == "regenerate" for e in service.store.events()) == 1
    service.vote("s1", -1, "like")


def test_a_chat_past_its_length_limit_asks_for_a_new_chat(service, monkeypatch):
    # Review s23: a chat had no length limit (only the 300 messages a day), and every
    # streamed token re-renders the whole chat: hundreds of 4,000-character messages made
    # each token of that chat's answers cost that much CPU beside everyone's.
    from chat_ui import handlers

    monkeypatch.setattr(handlers, "MAX_CHAT_CHARS", 100)
    first = last(service.send("s1", "x" * 60, None, {"max_new_tokens": 4}))[-1].messages
    chars = 60 + len(first[-1]["content"]) + 60
    assert chars > 100
    with pytest.raises(InputError, match=rf"too long \({chars} characters.*limit is 100.*new chat"):
        list(service.send("s1", "y" * 60, None, {"max_new_tokens": 4}))
    assert service.store.counts()["turns"] == 1
    # A rewrite, which may be four times its answer, is held to the same limit.
    with pytest.raises(InputError, match="too long"):
        service.rewrite("s1", -1, "z" * 60)
    service.new_chat("s1")
    assert last(service.send("s1", "y" * 60, None, {"max_new_tokens": 4}))[-1].messages


def test_past_the_session_cap_one_sweep_runs_at_a_time(service, monkeypatch):
    # Review s11: past MAX_SESSIONS every request started a thread walking every session.
    import threading

    from chat_ui import handlers

    monkeypatch.setattr(handlers, "MAX_SESSIONS", 5)
    release, calls = threading.Event(), []

    def slow_sweep(now=None):
        calls.append(now)
        release.wait(10)
        return 0

    monkeypatch.setattr(service, "expire_idle", slow_sweep)
    for n in range(50):
        service.session(f"visitor-{n}")
    release.set()
    assert len(calls) == 1


def test_nothing_unsaved_is_lost_when_a_tab_closes_during_an_outage(service, monkeypatch):
    # Review s11: drop_session forgot the session when its last flush failed (the answers
    # kept for the store were gone), and reactions queued behind saved answers (a
    # regenerate while the store was down) were never retried by the status tick.
    from rlhf_core.feedback import FeedbackUnavailable

    def down(*_args, **_kwargs):
        raise FeedbackUnavailable("the store is down")

    store = service.store
    with monkeypatch.context() as outage:
        outage.setattr(store, "save_turn", down)
        answer = last(service.send("s1", "Hello", None, {"max_new_tokens": 4}))[-1]
        assert "unreachable" in answer.notices[0]
        service.drop_session("s1")  # the tab closes while the store is still down
    service.expire_idle()
    assert [t.session_id for t in store.turns()] == ["s1"]
    assert "s1" not in service._sessions  # saved, then dropped

    last(service.send("s2", "Hello", None, {"max_new_tokens": 4}))
    with monkeypatch.context() as outage:
        outage.setattr(store, "record_event", down)
        last(service.regenerate("s2", -1, {"max_new_tokens": 4}))  # shown; its event queued
        assert service.status("s2")["store_ok"] is False
    assert service.status("s2")["store_ok"] is True
    assert [e.kind for e in store.events()] == ["regenerate"]


def test_a_closed_stream_does_not_wait_for_the_session_lock(service):
    # Review 2 of s11: Gradio closes the generator of a client that left on its event loop,
    # and the close waited for the session's lock, which handlers hold across Redis calls
    # (up to the socket timeout while Redis hangs): one closed tab stalled every visitor.
    import threading
    import time

    updates = service.send("s1", "Hello", None, {"max_new_tokens": 64})
    assert not next(updates).done
    session = service.session("s1")
    held, release = threading.Event(), threading.Event()

    def hold_the_lock():
        with session.lock:
            held.set()
            release.wait(10)

    holder = threading.Thread(target=hold_the_lock)
    holder.start()
    held.wait(5)
    started = time.monotonic()
    updates.close()
    closed_in = time.monotonic() - started
    release.set()
    holder.join()
    assert closed_in < 2 and session.streaming is None
    assert not last(service.send("s1", "Hello again", None, {"max_new_tokens": 4}))[-1].notices


def test_a_chat_answers_one_message_at_a_time(service):
    # Review 2 of s11: two sends on one chat id at once were both answered (Enter in the box
    # while an answer streams, or any script): each took the context without the other,
    # they landed in an order nobody sent, and one chat held two decode slots.
    first = service.send("s1", "Hello", None, {"max_new_tokens": 64})
    assert not next(first).done
    for second in (
        lambda: service.send("s1", "Are you there?", None, {"max_new_tokens": 4}),
        lambda: service.regenerate("s1", -1, {"max_new_tokens": 4}),
    ):
        with pytest.raises(InputError, match="still being written in this chat"):
            list(second())
    assert not last(service.send("s2", "Another chat", None, {"max_new_tokens": 4}))[-1].notices
    list(first)  # the first answer ends and is stored
    messages = last(service.send("s1", "Now?", None, {"max_new_tokens": 4}))[-1].messages
    assert [m["content"] for m in messages if m["role"] == "user"] == ["Hello", "Now?"]
    assert len(list(service.store.turns())) == 3
    # A stream closed half-way (a tab that left) frees the chat too.
    closed = service.send("s1", "Long one", None, {"max_new_tokens": 64})
    next(closed)
    closed.close()
    assert last(service.send("s1", "And now?", None, {"max_new_tokens": 4}))


def test_an_unload_while_answering_does_not_free_the_chat(service):
    # Review of s12: an unload (any script can send one for its own chat) dropped the
    # session while it answered, and the next send found a new one with nothing running.
    first = service.send("s1", "Hello", None, {"max_new_tokens": 64})
    next(first)
    service.drop_session("s1")
    with pytest.raises(InputError, match="still being written in this chat"):
        list(service.send("s1", "Again", None, {"max_new_tokens": 4}))
    list(first)
    assert [m["content"] for m in service.session("s1").messages][:1] == ["Hello"]


# Review of s17 (a helper): the page disables nothing while an answer streams, and Undo, New
# chat and Delete my data run beside a send (other queue groups), as any script may call them.
def test_undo_while_an_answer_streams_takes_back_that_message(service, tiny_settings):
    # Undo took back the *previous* message (marked it "don't train", its text back in the
    # box), then the streaming answer was saved, trainable, with that text as its context.
    from rlhf_core.datasets import export_rows

    last(service.send("s1", "my card is 4111 oops", None, {"max_new_tokens": 4}))
    streaming = service.send("s1", "what I meant to ask", None, {"max_new_tokens": 64})
    assert not next(streaming).done
    update = service.undo("s1")
    assert update.textbox == "what I meant to ask"  # the message being answered comes back
    with pytest.raises(InputError, match="stopped by Undo"):
        list(streaming)
    session = service.session("s1")
    assert [m["content"] for m in session.messages][:1] == ["my card is 4111 oops"]
    assert len(session.messages) == 2 and session.streaming is None
    assert len(list(service.store.turns())) == 1  # the stopped answer is not stored
    rows = export_rows(service.store, "turns", settings=tiny_settings)
    assert [r["messages"][-1]["content"] for r in rows] == ["my card is 4111 oops"]
    # The next Undo takes back the first message, as it would have without the stream.
    assert service.undo("s1").textbox == "my card is 4111 oops"
    assert export_rows(service.store, "turns", settings=tiny_settings) == []
    # Undo while a regenerate streams stops it; the answer it would replace stays.
    last(service.send("s1", "again", None, {"max_new_tokens": 4}))
    before = [dict(m) for m in service.session("s1").messages]
    regenerating = service.regenerate("s1", -1, {"max_new_tokens": 64})
    next(regenerating)
    assert service.undo("s1").textbox is None
    with pytest.raises(InputError, match="stopped by Undo"):
        list(regenerating)
    assert service.session("s1").messages == before
    assert last(service.send("s1", "and now", None, {"max_new_tokens": 4}))


def test_new_chat_while_an_answer_streams_stops_it(service, tiny_settings):
    # The answer was saved, trainable, shown nowhere, and filed under the new chat: Undo
    # brought the old chat back, and its "don't train" switch did not cover the answer.
    from rlhf_core.datasets import export_rows

    last(service.send("s1", "chat A first", None, {"max_new_tokens": 4}))
    streaming = service.send("s1", "chat A second", None, {"max_new_tokens": 64})
    next(streaming)
    assert service.new_chat("s1").messages == []
    with pytest.raises(InputError, match="the chat changed"):
        list(streaming)
    service.undo("s1")  # chat A comes back
    assert [m["content"] for m in service.session("s1").messages][:1] == ["chat A first"]
    service.set_no_train("s1", True)
    assert export_rows(service.store, "turns", settings=tiny_settings) == []
    assert len(list(service.store.turns())) == 1


def test_reactions_while_an_answer_streams_find_the_answer_the_page_shows(service):
    # The page's index was converted twice (against the page, then the stored chat), and
    # rewrite converted it against the stored chat alone: an out-of-range 👍 landed on an
    # answer, Rewrite of the streaming answer (-1) edited the one before it, and an edit of
    # the answer a regenerate writes was taken as a rewrite of the answer it replaces.
    last(service.send("s1", "one", None, {"max_new_tokens": 4}))
    last(service.send("s1", "two", None, {"max_new_tokens": 4}))
    streaming = service.send("s1", "three", None, {"max_new_tokens": 64})
    next(streaming)  # the page: one, a1, two, a2, three, (answer streaming)
    for index in (-7, -2, 4, 6):
        with pytest.raises(InputError, match="not a finished answer"):
            service.vote("s1", index, "like")
    with pytest.raises(InputError, match="not a finished answer"):
        service.rewrite("s1", -1, "edited")
    service.vote("s1", -3, "like")  # a2 on the page
    service.rewrite("s1", 1, "a1, edited")
    service.vote("s1", -1, "dislike")  # the streaming answer: counted once it is stored
    messages = last(streaming)[-1].messages
    assert [m.get("vote") for m in messages if m["role"] == "assistant"] == [
        None, "like", "dislike"
    ]  # fmt: skip
    assert messages[1]["content"] == "a1, edited"
    assert [m["content"] for m in messages[::2]] == ["one", "two", "three"]
    regenerating = service.regenerate("s1", 1, {"max_new_tokens": 64})
    next(regenerating)  # the page: one, (a new answer streaming in a1's place)
    old = service.session("s1").messages[1]
    for index in (1, 3, 5):
        with pytest.raises(InputError, match="not a finished answer"):
            service.rewrite("s1", index, "my edit")
    list(regenerating)
    states = resolve_events(service.store.events())
    assert states[old["turn_id"]].rewrite == "a1, edited"  # only the edit made before


def test_odd_unicode_is_kept(service):
    text = (
        "RTL \u202eabc\u202c, emoji 👩‍👩‍👧, combining e\u0301, lone \ud800 surrogate, <|im_start|>"
    )
    updates = last(service.send("s1", text, None, {"max_new_tokens": 4}))
    turn = service.store.get_turn(updates[-1].messages[-1]["turn_id"])
    user = turn.messages[-1]["content"]
    assert "👩‍👩‍👧" in user and "\u202e" in user and "e\u0301" in user and "<|im_start|>" in user
    assert "\ufffd" in user  # the surrogate, which UTF-8 cannot carry, is replaced


def test_long_conversation_is_trimmed_and_said_so(tiny_settings, tiny_model, service):
    settings = tiny_settings.model_copy(update={"max_context_tokens": 120})
    small = ChatService(settings, PolicyServer(tiny_model, settings), service.store)
    notices = []
    for i in range(8):
        for update in small.send("s1", f"question number {i} " * 4, None, {"max_new_tokens": 4}):
            notices += update.notices
    assert any("left out" in n for n in notices)
    turns = small.store.turns_for_session("s1")
    assert len(turns) == 8
    # The system prompt and the last question always survive trimming.
    assert turns[-1].messages[0]["role"] == "system"
    assert turns[-1].messages[-1]["content"].startswith("question number 7")
    assert len(turns[-1].messages) < 2 * 8


def test_sessions_do_not_see_each_other(service):
    last(service.send("alice", "my secret is 42", None, {"max_new_tokens": 4}))
    updates = last(service.send("bob", "hello", None, {"max_new_tokens": 4}))
    assert all("42" not in m["content"] for m in updates[-1].messages if m["role"] == "user")
    turn = service.store.get_turn(updates[-1].messages[-1]["turn_id"])
    assert all("secret" not in m["content"] for m in turn.messages)
    with pytest.raises(InputError):  # bob has one answer only, at index 1
        service.vote("bob", 3, "like")


# --- the served app through gradio_client ---------------------------------------------
def text(message) -> str:
    """A Chatbot message's text (Gradio 6 sends content as a list of parts)."""
    content = message["content"]
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content)
    return content


def answers_of(result):
    chat, answers, badge = result[:3]
    return chat, answers, badge


def events_by_turn(store):
    events = list(store.events())
    return events, resolve_events(events)


def test_send_vote_edit_regenerate_undo_through_the_api(app):
    store = app.service.store
    client = Client(app.url, verbose=False)

    job = client.submit("Hi! How are you?", "Be brief.", *SAMPLING, api_name="/send")
    outputs = job.outputs()
    chat, answers, badge = answers_of(job.result())
    assert len(outputs) >= 2, "the answer should stream in several updates"
    assert [m["role"] for m in chat] == ["user", "assistant"]
    assert "written by v0" in text(chat[1]) and "current policy version 0" in badge
    turn_id = answers[0]["turn_id"]
    turn = store.get_turn(turn_id)
    assert turn is not None and turn.policy_version == 0 and turn.sampling["max_new_tokens"] == 8

    # like; a repeated like is one event; then change the vote
    _, answers, _ = client.predict(-1, "like", api_name="/vote")
    assert answers[0]["vote"] == "like"
    client.predict(-1, "like", api_name="/vote")
    _, answers, _ = client.predict(1, "dislike", api_name="/vote")
    assert answers[0]["vote"] == "dislike"
    events, state = events_by_turn(store)
    assert [e.kind for e in events] == ["like", "dislike"]
    assert state[turn_id].vote == "dislike"

    # edit the answer into a better one
    chat, answers, _ = client.predict(1, "I am fine, thanks!", api_name="/rewrite")
    assert text(chat[1]).startswith("I am fine, thanks!")
    _, state = events_by_turn(store)
    assert state[turn_id].rewrite == "I am fine, thanks!"

    # regenerate: a new turn on the same context, linked to the old one
    chat, answers, _ = client.predict(-1, *SAMPLING, api_name="/regenerate")
    new_id = answers[0]["turn_id"]
    assert new_id != turn_id
    new_turn = store.get_turn(new_id)
    assert new_turn.parent_turn_id == turn_id and new_turn.messages == turn.messages
    events, state = events_by_turn(store)
    assert state[turn_id].regenerated

    # undo brings the earlier answer back and retracts the regenerate
    chat, answers = client.predict(api_name="/undo")[:2]
    assert answers[0]["turn_id"] == turn_id
    assert text(chat[1]).startswith("I am fine, thanks!")
    _, state = events_by_turn(store)
    assert not state[turn_id].regenerated and state[turn_id].vote == "dislike"

    # multi-turn: the second turn's context holds the first exchange (with the rewrite)
    chat, answers, _, _ = client.predict("And then?", "Be brief.", *SAMPLING, api_name="/send")
    second = store.get_turn(answers[1]["turn_id"])
    assert [m["role"] for m in second.messages] == ["system", "user", "assistant", "user"]
    assert second.messages[2]["content"] == "I am fine, thanks!"

    status = client.predict(api_name="/status")
    assert status["store"]["turns"] == 3 and status["current_version"] == 0

    chat, answers, _ = client.predict(api_name="/new_chat")
    assert chat == [] and answers == []


def test_undo_while_an_answer_streams_through_the_api(app):
    # The real path of an Undo clicked while an answer streams: the send ends with the
    # notice, the message is back in the box, nothing of the answer is stored.
    from conftest import answer_streaming

    client = Client(app.url, verbose=False)
    with answer_streaming(app, client) as job:  # Undo arrives while it streams
        chat, answers, _, box, _ = client.predict(api_name="/undo")
        assert box == "Tell me a long story" and chat == [] and answers == []
        with pytest.raises(AppError, match="stopped by Undo"):
            job.result()
        assert list(app.service.store.turns()) == []
        chat, answers, _ = answers_of(client.predict("Short one", "", *SAMPLING, api_name="/send"))
        assert [m["role"] for m in chat] == ["user", "assistant"]


def test_bad_input_and_separate_sessions_through_the_api(app):
    alice, bob = Client(app.url, verbose=False), Client(app.url, verbose=False)
    with pytest.raises(AppError, match="empty message"):
        alice.predict("  ", "", *SAMPLING, api_name="/send")
    with pytest.raises(AppError, match="limit is"):
        alice.predict("y" * 5000, "", *SAMPLING, api_name="/send")
    with pytest.raises(AppError, match="not a finished answer"):
        alice.predict(-1, "like", api_name="/vote")
    chat, *_ = alice.predict("alice's question", "", *SAMPLING, api_name="/send")
    chat, *_ = bob.predict("bob's question", "", *SAMPLING, api_name="/send")
    assert [text(m) for m in chat if m["role"] == "user"] == ["bob's question"]
    chat, *_ = alice.predict(api_name="/new_chat")
    assert chat == []


def test_many_users_at_once(app):
    clients = [Client(app.url, verbose=False) for _ in range(4)]
    jobs = [
        c.submit(f"user {i} asks", "", *SAMPLING, api_name="/send") for i, c in enumerate(clients)
    ]
    for i, job in enumerate(jobs):
        chat, answers, *_ = job.result(timeout=120)
        assert [text(m) for m in chat if m["role"] == "user"] == [f"user {i} asks"]
        turn = app.service.store.get_turn(answers[0]["turn_id"])
        assert turn.messages[-1]["content"] == f"user {i} asks"
    turns = list(app.service.store.turns())
    assert len(turns) == 4 and len({t.session_id for t in turns}) == 4


def test_the_training_tabs_tally_follows_the_full_count_and_reads_only_whats_new(
    redis_client, tiny_settings, monkeypatch
):
    # Review of s13: every open Training tab re-read the whole store for the 👍 rate of each
    # version (every TAB_REFRESH_S; about 2 s at 20,000 turns). The tally must give what
    # the full read gives (thumbs_up_rate, the reference) after any mix of reactions,
    # undos, new answers and deletions, while reading only what is new.
    import random

    from chat_ui.training import ThumbsTally, thumbs_up_rate
    from rlhf_core import privacy
    from rlhf_core.feedback import Event, Turn, new_id

    store = FeedbackStore(redis_client)
    tally = ThumbsTally(store)
    rng = random.Random(0)
    turns: list[Turn] = []
    users = ["ann", "bob", "cid"]
    most = 0
    assert tally.counts() == thumbs_up_rate(store) == {}
    for step in range(200):
        op = rng.random()
        if op < 0.3 or not turns:
            user = rng.choice(users)
            turn = Turn(new_id(), f"{user}-s", user, [{"role": "user", "content": "q"}], "a",
                        policy_version=rng.randrange(3))  # fmt: skip
            store.save_turn(turn)
            turns.append(turn)
        elif op < 0.97:
            turn = rng.choice(turns)
            kind = rng.choice(["like"] * 3 + ["dislike"] * 2 + ["unvote", "undo", "rewrite"])
            text = "better" if kind == "rewrite" else None
            store.record_event(Event.new(turn.turn_id, kind, turn.session_id, turn.user_id, text))
        else:  # a person deletes their data: turns and events go
            user = rng.choice(users)
            privacy.forget_user(redis_client, tiny_settings, user)
            turns = [t for t in turns if t.user_id != user]
            users.remove(user)
            users.append(f"{user}{step}")  # a deleted user cannot write again
        if step % 3 == 0:
            counts = tally.counts()
            assert counts == thumbs_up_rate(store), f"step {step}"
            most = max(most, sum(votes for _, votes in counts.values()))
    assert tally.counts() == thumbs_up_rate(store)
    assert most >= 10  # the comparisons counted votes

    # Once counted, a refresh reads the events since, not the store.
    monkeypatch.setattr(store, "turns", lambda *a, **k: pytest.fail("read every turn"))
    monkeypatch.setattr(store, "events", lambda *a, **k: pytest.fail("read every event"))
    turn = turns[-1]
    before = tally.counts().get(turn.policy_version, (0, 0))
    store.record_event(Event.new(turn.turn_id, "unvote", turn.session_id, turn.user_id))
    store.record_event(Event.new(turn.turn_id, "like", turn.session_id, turn.user_id))
    likes, votes = tally.counts()[turn.policy_version]
    assert votes in (before[1], before[1] + 1) and likes >= before[0]
    monkeypatch.undo()
    assert tally.counts() == thumbs_up_rate(store)
