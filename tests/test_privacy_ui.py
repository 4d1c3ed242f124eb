"""Consent and deletion through the chat UI: the handlers, then the served app over HTTP
(gradio_client) with the records checked in a real Valkey server."""

from __future__ import annotations

import json
import urllib.request

import pytest
from gradio_client import Client

from chat_ui.handlers import ChatService, InputError
from chat_ui.training import decide_rewrites, review_rows
from rlhf_core import datasets as ds
from rlhf_core.feedback import FeedbackStore
from rlhf_core.redis_server import connect
from rlhf_core.serving import PolicyServer

SAMPLING = (1.0, 0.9, 8)


@pytest.fixture()
def service(tiny_settings, tiny_model):
    store = FeedbackStore(connect(tiny_settings))
    return ChatService(tiny_settings, PolicyServer(tiny_model, tiny_settings), store)


def ask(service, session, text):
    return list(service.send(session, text, None, {"max_new_tokens": 4}))[-1]


def test_dont_train_switch_covers_the_whole_chat_and_new_chats_follow_it(service, tiny_settings):
    ask(service, "s1", "first question")
    service.vote("s1", -1, "like")
    ask(service, "s1", "second question")
    assert len(ds.export_rows(service.store, "kto", settings=tiny_settings)) == 1

    update = service.set_no_train("s1", True)
    assert "will not be used for training" in update.notices[0]
    # The answers already given are out, and so is what comes next in this chat.
    service.vote("s1", -1, "dislike")
    ask(service, "s1", "third question")
    service.vote("s1", -1, "like")
    assert ds.export_rows(service.store, "kto", settings=tiny_settings) == []
    assert ds.export_rows(service.store, "turns", settings=tiny_settings) == []
    assert all(not e.may_train for e in list(service.store.events())[1:])
    # The switch stays as set for a new chat (the page shows it), and switching back
    # lets only the chat in front of the person train.
    service.new_chat("s1")
    ask(service, "s1", "new chat")
    service.set_no_train("s1", False)
    service.vote("s1", -1, "like")
    rows = ds.export_rows(service.store, "turns", settings=tiny_settings)
    assert [r["messages"][-1]["content"] for r in rows] == ["new chat"]
    with pytest.raises(InputError, match="true or false"):
        service.set_no_train("s1", "yes")


def test_reactions_made_after_signing_out_do_not_train(service, tiny_settings):
    # Review 1 of s11: an event carried only the chat switch, so a chat that signed out
    # (anonymous visitors may not train in public) reacted anonymously to the answers of
    # its signed-in turns, and those reactions trained.
    service.session("s1", "alice", True)
    ask(service, "s1", "signed in")
    service.vote("s1", -1, "like")
    assert len(ds.export_rows(service.store, "kto", settings=tiny_settings)) == 1
    service.session("s1", "anon:cookie1", False)  # signed out: the web layer says so
    service.vote("s1", -1, "dislike")
    rows = ds.export_rows(service.store, "kto", settings=tiny_settings)
    assert [r["label"] for r in rows] == [True], "the anonymous dislike must not train"
    # An un-vote only takes back, whoever makes it: the like is gone.
    service.vote("s1", -1, "unvote")
    assert ds.export_rows(service.store, "kto", settings=tiny_settings) == []


def test_forget_me_deletes_this_users_data_only(service, tiny_settings):
    ask(service, "alice", "my number is +1 415-555-2671")
    service.vote("alice", -1, "like")
    ask(service, "bob", "hello")
    update = service.forget_me("alice")
    assert (
        update.messages == []
        and "Deleted your data: 1 answers and 1 reactions" in (update.notices[0])
    )
    assert {t.user_id for t in service.store.turns()} == {"bob"}
    assert list(service.store.events()) == []
    # Alice can go on chatting; that is new data.
    ask(service, "alice", "hello again")
    assert {t.user_id for t in service.store.turns()} == {"alice", "bob"}


def test_an_answer_streaming_when_data_is_deleted_is_not_stored(service):
    # Review s11: the turn was dated when its answer ended, after the tombstone, so an
    # answer still streaming when "Delete my data" was clicked was stored afterwards with
    # the whole deleted chat as its context, and trained.
    ask(service, "alice", "my address is 1 Main Street")
    for action in ("send", "regenerate"):
        if action == "send":
            updates = service.send(
                "alice", "and my phone is 555-2671", None, {"max_new_tokens": 12}
            )
        else:
            ask(service, "alice", "a question to regenerate")
            updates = service.regenerate("alice", -1, {"max_new_tokens": 12})
        first = next(updates)
        assert not first.done  # the answer is streaming
        service.forget_me("alice")
        with pytest.raises(InputError, match="the chat changed"):  # stopped, not stored
            list(updates)
        assert service.session("alice").messages == []  # the emptied chat
        assert [t for t in service.store.turns() if t.user_id == "alice"] == [], action
        assert list(service.store.events()) == []
    ask(service, "alice", "a new start")  # what comes after the deletion is kept
    assert [t.user_id for t in service.store.turns()] == ["alice"]


def test_a_message_sent_while_data_is_deleted_does_not_bring_it_back(service, monkeypatch):
    # Review of s17 (a helper): the chats were emptied after the store's deletion, so a
    # message sent meanwhile (another tab, a script: Delete my data and Send run side by
    # side) was answered with the deleted chat as its context, dated after the deletion's
    # marker, and stored.
    import threading

    import rlhf_core.privacy as privacy

    ask(service, "alice", "my secret is 12345")
    real_forget = privacy.forget_user
    sent: list = []

    def forget_while_alice_sends(*args, **kwargs):
        counts = real_forget(*args, **kwargs)  # marker written, data deleted
        sender = threading.Thread(
            target=lambda: sent.extend(service.send("alice", "next", None, {"max_new_tokens": 4}))
        )
        sender.start()
        sender.join(60)
        return counts

    monkeypatch.setattr(privacy, "forget_user", forget_while_alice_sends)
    service.forget_me("alice")
    assert sent and sent[-1].done
    stored = [m["content"] for t in service.store.turns() for m in t.messages]
    assert "next" in stored and not any("12345" in c for c in stored)
    assert [m["content"] for m in service.session("alice").messages][:1] == ["next"]


def test_review_panel_functions(service, tiny_settings, redis_client):
    settings = tiny_settings.model_copy(update={"review_rewrites": True})
    ask(service, "s1", "question")
    service.rewrite("s1", -1, "A rewritten answer")
    rows = review_rows(redis_client, settings)
    assert len(rows) == 1 and rows[0][2] == "question" and rows[0][4] == "A rewritten answer"
    assert decide_rewrites(redis_client, settings, 5, "approved").startswith("Give event ids")
    assert "not found" in decide_rewrites(redis_client, settings, "nope", "dropped")
    assert decide_rewrites(redis_client, settings, "", "approved").startswith("Approved")
    assert review_rows(redis_client, settings) == []
    assert len(ds.export_rows(service.store, "dpo", settings=settings)) == 1


# --- the served app over HTTP -----------------------------------------------------------
def test_consent_switch_and_delete_my_data_over_http(app, tiny_settings):
    store = app.service.store
    # The first-visit notice is on the page a stranger gets.
    with urllib.request.urlopen(app.url + "config", timeout=30) as response:
        config = json.loads(response.read())
    page = json.dumps(config)
    assert "used to train the model" in page and "Delete my data" in page

    alice, bob = Client(app.url, verbose=False), Client(app.url, verbose=False)
    alice.predict("Mail me at alice@gmail.com", "", *SAMPLING, api_name="/send")
    alice.predict(-1, "like", api_name="/vote")
    bob.predict("Hello", "", *SAMPLING, api_name="/send")
    bob.predict(-1, "dislike", api_name="/vote")
    bob.predict(True, api_name="/set_no_train")
    # Bob's chat is out of the export; Alice's e-mail address is scrubbed in it.
    rows = ds.export_rows(store, "turns", settings=tiny_settings)
    assert len(rows) == 1 and "<EMAIL_ADDRESS>" in rows[0]["messages"][-1]["content"]
    assert "alice@gmail.com" not in json.dumps(rows)

    chat, answers, _ = alice.predict(api_name="/delete_my_data")[:3]
    assert chat == [] and answers == []
    assert ds.export_rows(store, "turns", settings=tiny_settings) == []
    assert store.counts()["turns"] == 1  # bob's, kept but never trained on
    assert all("alice" not in json.dumps(t.to_dict()) for t in store.turns())


def test_undo_of_a_new_chat_brings_back_that_chats_training_switch(app, tiny_settings):
    # Review of s13: Undo of "New chat" brought the chat back with the switch as set in the
    # chat after it. Switched off, then a new chat switched on again, then Undo: the page
    # showed the switch on (training) over a chat whose answers do not train, and the next
    # answer in it was written to train: half of one chat in the training data.
    store = app.service.store
    person = Client(app.url, verbose=False)
    person.predict("keep this one out", "", *SAMPLING, api_name="/send")
    person.predict(True, api_name="/set_no_train")
    person.predict(api_name="/new_chat")
    person.predict(False, api_name="/set_no_train")  # for the new chat
    *_, switch = person.predict(api_name="/undo")
    assert switch is True  # the page shows the chat's own switch again
    person.predict("and this one", "", *SAMPLING, api_name="/send")
    person.predict(-1, "like", api_name="/vote")
    assert ds.export_rows(store, "turns", settings=tiny_settings) == []
    assert ds.export_rows(store, "kto", settings=tiny_settings) == []
    # The other way round: a chat that trains comes back training, and shows it.
    person.predict(api_name="/new_chat")  # the switch stays on for the new chat
    person.predict("fresh", "", *SAMPLING, api_name="/send")
    person.predict(api_name="/new_chat")
    person.predict(False, api_name="/set_no_train")
    person.predict("trains", "", *SAMPLING, api_name="/send")
    person.predict(api_name="/new_chat")
    person.predict(True, api_name="/set_no_train")
    *_, switch = person.predict(api_name="/undo")
    assert switch is False
    person.predict("this too", "", *SAMPLING, api_name="/send")
    rows = ds.export_rows(store, "turns", settings=tiny_settings)
    assert [r["messages"][-1]["content"] for r in rows] == ["trains", "this too"]


def test_an_answer_taken_back_with_undo_never_trains(app, tiny_settings):
    # Review of s13: Undo of a sent message took the exchange off the page (the text back in
    # the box) but its turn stayed trainable: a message sent by mistake became a PPO prompt
    # and a row of the turns export. The same for the answer a regenerate wrote.
    store = app.service.store
    person = Client(app.url, verbose=False)

    def exported():
        rows = ds.export_rows(store, "turns", settings=tiny_settings)
        return sorted(r["messages"][-1]["content"] for r in rows)

    person.predict("my card is 4111 1111 1111 1111, oops", "", *SAMPLING, api_name="/send")
    *_, textbox, _ = person.predict(api_name="/undo")
    assert "oops" in textbox
    assert exported() == []
    person.predict("what I meant to ask", "", *SAMPLING, api_name="/send")
    assert exported() == ["what I meant to ask"]
    # Switching the chat off and on again does not bring the taken-back one back.
    person.predict(True, api_name="/set_no_train")
    person.predict(False, api_name="/set_no_train")
    assert exported() == ["what I meant to ask"]
    # A regenerate taken back: its answer is out, the one it replaced is back and trains.
    _, answers, *_ = person.predict(-1, *SAMPLING, api_name="/regenerate")
    person.predict(api_name="/undo")
    assert len(ds.export_rows(store, "turns", settings=tiny_settings)) == 1
    assert store.counts()["turns"] == 3  # all three stay in the log


def test_a_vote_on_an_edit_that_may_not_train_is_no_vote_on_the_served_answer(
    service, tiny_settings, redis_client
):
    # Review of s26: a 👍 on an edited answer is on the person's text, not on what the
    # model wrote; with RLHF_REVIEW_REWRITES the rewrite waits (or is dropped), and the 👍
    # behind it then counted as a 👍 of the served answer.
    settings = tiny_settings.model_copy(update={"review_rewrites": True})
    ask(service, "s1", "question")
    service.rewrite("s1", -1, "A rewritten answer")
    service.vote("s1", -1, "like")
    assert ds.export_rows(service.store, "kto", settings=settings) == []
    assert decide_rewrites(redis_client, settings, "", "dropped").startswith("Dropped")
    assert ds.export_rows(service.store, "kto", settings=settings) == []
