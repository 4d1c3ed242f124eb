"""A stranger on a public deployment, over Gradio's plain HTTP API and gradio_client:
admin calls refused, forged and foreign sessions refused, rate limits hit with a clear
message, a flood of forged accounts kept out of training. Real Valkey, real Gradio."""

from __future__ import annotations

import json
import os
import stat
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import redis
from conftest import answer_streaming, wait_for
from gradio_client import Client
from gradio_client.exceptions import AppError

from chat_ui import access
from chat_ui.access import Access, Identity, RateLimited
from chat_ui.validation import InputError
from rlhf_core import datasets as ds
from rlhf_core.datasets import load_feedback, round_datasets
from rlhf_core.feedback import FeedbackStore
from rlhf_core.redis_server import (
    PASSWORD_FILE,
    URL_FILE,
    EmbeddedValkey,
    connect,
    redact,
    start_embedded_if_needed,
)
from rlhf_core.registry import ArtifactPathError, Registry, confined
from rlhf_core.settings import Settings

SAMPLING = (1.0, 0.9, 4)


# --- plain functions ---------------------------------------------------------------------
def test_cookie_signatures():
    secret = b"k" * 32
    value = access.new_cookie_value(secret)
    sid = access.verify(secret, value)
    assert sid is not None and value.startswith(sid)
    assert access.verify(b"other key", value) is None  # another server's cookie
    assert access.verify(secret, "0" * 32 + "." + value.split(".")[1]) is None  # sid swapped
    assert access.verify(secret, value[:-1] + ("0" if value[-1] != "0" else "1")) is None
    for junk in (None, "", "abc", "x" * 300, "../../.", "0" * 32 + ".00"):
        assert access.verify(secret, junk) is None


def test_who_is_admin_and_who_trains():
    local = Settings(host="127.0.0.1")
    space = Settings(host="0.0.0.0")
    named = Settings(host="127.0.0.1", admins="root, ops")
    # loopback, nobody named: the person at this machine runs it
    assert access.is_admin(None, local, local=True) and not access.is_admin(None, local)
    assert access.anonymous_may_train(local) and not access.is_public(local)
    # listening on every address: strangers; nobody is admin until named
    assert access.is_public(space) and not access.anonymous_may_train(space)
    assert not access.is_admin(None, space, local=True)
    # named admins: exactly them, the local user included
    assert access.is_admin("ops", named) and not access.is_admin(None, named, local=True)
    assert not access.is_admin("mallory", named)
    anon = Identity(user_id="anon:1", account=None, session_id="s", ip="1.2.3.4")
    alice = Identity(user_id="alice", account="alice", session_id="t", ip="1.2.3.4")
    assert not access.may_train(anon, space) and access.may_train(alice, space)
    assert access.may_train(anon, space.model_copy(update={"anonymous_train": True}))
    assert not access.may_chat(anon, space.model_copy(update={"anonymous_chat": False}))


def test_account_comes_only_from_the_configured_sign_in():
    import time

    class Starlette:  # what gr.Request wraps: the OAuth session lives in scope
        def __init__(self, session, headers=None):
            self.scope = {"session": session}
            self.headers = headers or {}

    class GrRequest:
        def __init__(self, underlying, username=None):
            self.request, self.headers, self.username = underlying, underlying.headers, username

    def oauth(name, expires_in=60.0):
        info = {"userinfo": {"preferred_username": name}, "expires_at": time.time() + expires_in}
        return {"oauth_info": info}

    hf, header, none = Settings(auth="hf"), Settings(auth="header"), Settings(auth="none")
    assert access.account_of(GrRequest(Starlette(oauth("alice"))), hf) == "alice"
    assert access.account_of(GrRequest(Starlette(oauth("alice", -1))), hf) is None  # expired
    assert access.account_of(GrRequest(Starlette({})), hf) is None
    claimed = GrRequest(Starlette({}, {"x-forwarded-user": "root"}))
    assert access.account_of(claimed, header) == "root"  # a trusted proxy set it
    # Without a proxy in front, the same header from a stranger names nobody.
    assert access.account_of(claimed, none) is None and access.account_of(claimed, hf) is None
    assert access.account_of(GrRequest(Starlette({}), username="bob"), Settings(auth="gradio"))
    # Our anonymous ids cannot be claimed as an account.
    anon = GrRequest(Starlette({}, {"x-forwarded-user": "anon:1234"}))
    assert access.account_of(anon, header) is None


def test_client_ip_is_the_last_hop_of_a_trusted_header():
    class Req:
        headers = {"x-forwarded-for": "6.6.6.6, 10.0.0.1, 203.0.113.7"}
        client = type("C", (), {"host": "10.0.0.2"})()

    settings = Settings(client_ip_header="X-Forwarded-For")
    # The client wrote the first entries; the proxy appended the last one.
    assert access.client_ip(Req(), settings) == "203.0.113.7"
    assert access.client_ip(Req(), Settings()) == "10.0.0.2"  # no trusted header set


def test_rate_limits_per_account_and_per_ip_in_redis(redis_client, valkey):
    settings = Settings(redis_url=valkey.url, message_rate="3/minute", message_rate_ip="5/minute")
    gate = Access(settings, redis_client, valkey.url)
    other_replica = Access(settings, redis.Redis.from_url(valkey.url), valkey.url)

    def person(n: int, ip: str = "198.51.100.1") -> Identity:
        return Identity(user_id=f"anon:{n}", account=None, session_id=f"s{n}", ip=ip)

    for replica in (gate, other_replica, gate):  # the count is shared through Redis
        replica.check_rate("message", person(1))
    with pytest.raises(RateLimited, match=r"at most 3 per minute from one account.*Try again in"):
        other_replica.check_rate("message", person(1))
    # Fresh accounts from the same address: the per-IP window (5) still closes.
    gate.check_rate("message", person(2))
    gate.check_rate("message", person(3))
    with pytest.raises(RateLimited, match="from one address"):
        gate.check_rate("message", person(4))
    gate.check_rate("message", person(5, ip="198.51.100.2"))  # another address is not held up
    admin = Identity("root", "root", "s9", "198.51.100.1", admin=True)
    for _ in range(10):
        gate.check_rate("message", admin)  # admins are not counted


def test_an_ipv6_visitor_is_one_address_per_64_block(redis_client, valkey):
    # Review s11: the windows were keyed on the full address, and one IPv6 line holds a /64
    # (2^64 addresses): a fresh address and cookie per request was never held up.
    assert access.address_block("2001:db8:1:2:aaaa::1") == "2001:db8:1:2::/64"
    assert access.address_block("::ffff:198.51.100.7") == "198.51.100.7"
    assert access.address_block("198.51.100.7") == "198.51.100.7"
    assert access.address_block("not an address") == "not an address"
    settings = Settings(redis_url=valkey.url, message_rate="", message_rate_ip="5/minute")
    gate = Access(settings, redis_client, valkey.url)
    for n in range(1, 6):
        gate.check_rate("message", Identity(f"anon:{n}", None, f"s{n}", f"2001:db8:1:2::{n}"))
    with pytest.raises(RateLimited, match="from one address"):
        gate.check_rate("message", Identity("anon:6", None, "s6", "2001:db8:1:2:ffff::6"))
    gate.check_rate("message", Identity("anon:7", None, "s7", "2001:db8:1:3::7"))  # next /64


# --- infrastructure ------------------------------------------------------------------------
def test_embedded_valkey_has_a_private_password(tmp_path):
    settings = Settings(data_dir=tmp_path, redis_url=None)
    url, server = start_embedded_if_needed(settings)
    try:
        assert server is not None
        for name in (PASSWORD_FILE, URL_FILE, "valkey.conf"):
            mode = stat.S_IMODE(os.stat(tmp_path / name).st_mode)
            assert mode == 0o600, f"{name} is {oct(mode)}"
        password = (tmp_path / PASSWORD_FILE).read_text().strip()
        assert len(password) >= 32 and password in url and password not in redact(url)
        # Without the password the server answers nothing but an auth error.
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(host="127.0.0.1", port=server.port).ping()
        # A command beside `up` (same data folder) connects through redis.url.
        assert connect(settings).ping()
        # The password is not on the server's command line (ps shows it to every user).
        cmdline = open(f"/proc/{server.process.pid}/cmdline", "rb").read()
        assert password.encode() not in cmdline
    finally:
        server.stop()
    # A restart on the same folder keeps the password: saved URLs stay valid.
    with EmbeddedValkey(tmp_path) as again:
        assert password in again.url


def test_artifact_paths_from_redis_stay_inside_their_folder(tiny_settings, redis_client, tmp_path):
    root = tmp_path / "artifacts"
    root.mkdir()
    assert confined(root, "a" * 32, "policy") == (root / ("a" * 32) / "policy").resolve()
    for bad in (("..", "etc"), ("/etc",), ("a/../../x",)):
        with pytest.raises(ArtifactPathError):
            confined(root, *bad)
    # A version whose metadata someone rewrote in Redis is refused, not followed.
    settings = tiny_settings.model_copy(update={"artifact_dir": root})
    registry = Registry(redis_client, settings)
    meta = {"kinds": ["policy"], "parent": 0}
    redis_client.hset(
        "rlhf:registry:version:1",
        mapping={
            "version": 1, "meta": json.dumps(meta), "created_at": 0, "previous_current": 0,
            "fencing_token": 1, "artifact": "../../../../etc", "storage": "shared",
        },
    )  # fmt: skip
    redis_client.rpush("rlhf:registry:versions", 1)
    with pytest.raises(ArtifactPathError, match="tampered"):
        registry.materialize(1)


# --- the stranger, over HTTP -------------------------------------------------------------------
@pytest.fixture()
def serve_app(tiny_settings):
    """serve(...) with settings overrides; every app started is closed after the test."""
    from chat_ui.app import serve
    from rlhf_core.redis_server import free_port

    started = []

    def start(**overrides):
        settings = tiny_settings.model_copy(update={"port": free_port(), **overrides})
        started.append(serve(settings, block=False))
        return started[-1]

    yield start
    for app in started:
        app.close()


def http_call(http: httpx.Client, name: str, data: list, session_hash: str, **kw):
    """POST /gradio_api/call/NAME, then read its event stream: (status, 'complete' or
    'error', payload)."""
    response = http.post(
        f"/gradio_api/call/{name}", json={"data": data, "session_hash": session_hash}, **kw
    )
    if response.status_code != 200:
        return response.status_code, "refused", response.json()
    event_id = response.json()["event_id"]
    text = http.get(f"/gradio_api/call/{name}/{event_id}", **kw).text
    kind = "error" if "event: error" in text else "complete"
    payload = text.rsplit("data:", 1)[-1].strip()
    return 200, kind, payload


def visitor(url: str) -> httpx.Client:
    """A stranger's HTTP client that kept the cookie the page set."""
    http = httpx.Client(base_url=url.rstrip("/"), timeout=60)
    assert http.get("/").status_code == 200
    assert access.COOKIE in http.cookies
    return http


PUBLIC = {"public": True, "admins": "root", "auth": "header"}


def test_admin_calls_are_refused_to_strangers(serve_app, redis_client):
    app = serve_app(**PUBLIC, review_rewrites=True)
    registry = Registry(redis_client, app.settings)
    redis_client.set("rlhf:registry:current", 0)
    bare = httpx.Client(base_url=app.url.rstrip("/"), timeout=60)
    # No cookie at all: the session was not issued by this server.
    status, kind, payload = http_call(bare, "rollback", [0], "s-bare")
    assert kind == "error" and "no session cookie" in payload
    stranger = visitor(app.url)
    for _ in range(20):
        status, kind, payload = http_call(stranger, "train_now", [], "s-stranger")
        assert kind == "error" and "Only an admin" in payload
    assert redis_client.llen("train") == 0, "no round may be queued by a stranger"
    status, kind, payload = http_call(stranger, "rollback", [0], "s-stranger")
    assert kind == "error" and "Only an admin" in payload
    # Promote, the candidate's share, and the review of other people's rewrites too.
    for name, data in (
        ("ab_promote", []), ("ab_rollback", []), ("ab_share", [1.0]),
        ("review_list", []), ("approve_rewrites", [""]), ("drop_rewrites", [""]),
    ):  # fmt: skip
        status, kind, payload = http_call(stranger, name, data, "s-stranger")
        assert kind == "error" and "Only an admin" in payload, name
    # A header the trusted proxy sets names an admin: allowed, and one round at most.
    root = {"headers": {"X-Forwarded-User": "root"}}
    for _ in range(5):
        status, kind, payload = http_call(stranger, "train_now", [], "s-root", **root)
        assert kind == "complete", payload
    assert "already queued" in payload
    assert redis_client.llen("train") == 1, "Train now queues at most one round"
    assert registry.current() == 0
    # Handlers not meant for visitors do not answer by name.
    for name in ("refresh", "on_tick", "sync_feedback", "on_page_load", "false", "on_like"):
        status, kind, payload = http_call(stranger, name, [], "s-stranger")
        assert status == 404 and "No public endpoint" in payload["detail"], name
    # Errors carry no internal address or exception text.
    assert "127.0.0.1" not in json.dumps(payload) and "Traceback" not in json.dumps(payload)


def test_hugging_face_sign_in_off_a_space_is_refused_in_public(serve_app, monkeypatch):
    # Review of s24: off a Space, Gradio mocks Hugging Face sign-in (whoever clicks it becomes
    # the HF account the machine is logged in with) and signs its session cookie with
    # sha256("-v4"), a constant anyone can read in Gradio's source. With RLHF_AUTH=hf on a
    # public server (HF_TOKEN set, as for downloading models), a stranger's hand-signed
    # cookie named any account, RLHF_ADMINS included: Train now, roll back, promote.
    import base64
    import hashlib

    import gradio.oauth
    import itsdangerous

    monkeypatch.delenv("SPACE_ID", raising=False)
    # The machine is logged in to the Hub (offline here: Gradio's whoami, answered).
    monkeypatch.setattr(gradio.oauth, "_get_mocked_oauth_info", lambda: {
        "access_token": "hf_machine", "expires_at": int(time.time()) + 3600,
        "userinfo": {"preferred_username": "owner", "name": "owner"},
    })  # fmt: skip
    try:
        app = serve_app(public=True, admins="root", auth="hf")
    except ValueError as error:
        assert "RLHF_AUTH=hf" in str(error) and "Space" in str(error)
        return
    stranger = visitor(app.url)
    claim = {"oauth_info": {"expires_at": time.time() + 3600,
                            "userinfo": {"preferred_username": "root"}}}  # fmt: skip
    key = hashlib.sha256(b"-v4").hexdigest()
    cookie = itsdangerous.TimestampSigner(key).sign(base64.b64encode(json.dumps(claim).encode()))
    stranger.cookies.set("session", cookie.decode())
    _, kind, payload = http_call(stranger, "train_now", [], "forged-admin")
    assert kind == "error" and "Only an admin" in payload, "a forged cookie made an admin"


def test_password_guesses_from_one_address_are_bounded(serve_app):
    # Review of s24: with RLHF_AUTH=gradio, Gradio's POST /login took any number of guesses
    # of an admin's password from anyone, as fast as they came: 30 wrong in a row, then the
    # right one let in. Now one address has 10 tries a minute (access.LOGIN_RATE_IP).
    app = serve_app(public=True, admins="root", auth="gradio", auth_users="root:hunter2",
                    client_ip_header="X-Forwarded-For")  # fmt: skip
    guesser = httpx.Client(base_url=app.url.rstrip("/"), timeout=60,
                           headers={"X-Forwarded-For": "203.0.113.5"})  # fmt: skip
    codes = [
        guesser.post("/login", data={"username": "root", "password": f"guess{i}"}).status_code
        for i in range(30)
    ]
    assert codes[:10] == [400] * 10, codes
    assert set(codes[10:]) == {429}, codes
    right = guesser.post("/login", data={"username": "root", "password": "hunter2"})
    assert right.status_code == 429 and "sign-in attempts" in right.json()["detail"]
    # The admin, from their own address, still signs in.
    admin = httpx.Client(base_url=app.url.rstrip("/"), timeout=60,
                         headers={"X-Forwarded-For": "198.51.100.7"})  # fmt: skip
    assert admin.post("/login", data={"username": "root", "password": "hunter2"}).status_code == 200


def test_a_refused_sign_in_says_when_the_window_that_refused_it_opens(serve_app, monkeypatch):
    # Review of s25: the 429 always said Retry-After: 60, also when the day's window was
    # full (a client that obeyed it was refused again and again for a day).
    monkeypatch.setattr(access, "LOGIN_RATE_IP", "20/minute;5/day")
    app = serve_app(public=True, admins="root", auth="gradio", auth_users="root:hunter2",
                    client_ip_header="X-Forwarded-For")  # fmt: skip
    guesser = httpx.Client(base_url=app.url.rstrip("/"), timeout=60,
                           headers={"X-Forwarded-For": "203.0.113.9"})  # fmt: skip
    for i in range(5):
        assert guesser.post(
            "/login", data={"username": "root", "password": f"g{i}"}
        ).is_client_error
    refused = guesser.post("/login", data={"username": "root", "password": "g5"})
    assert refused.status_code == 429
    assert 23 * 3600 < int(refused.headers["retry-after"]) <= 24 * 3600
    assert "at most 5 per day" in refused.json()["detail"]
    assert "Try again in 24 hours" in refused.json()["detail"]


@pytest.mark.parametrize(
    ("seconds", "words"),
    [(1, "1 s"), (119, "119 s"), (120, "2 minutes"), (121, "3 minutes"), (7199, "120 minutes"),
     (7200, "2 hours"), (86399, "24 hours")],
)  # fmt: skip
def test_wait_words_worked_examples(seconds, words):
    assert access._wait_words(seconds) == words


def test_forged_and_foreign_sessions_are_refused(serve_app):
    app = serve_app(**PUBLIC)
    store = app.service.store
    owner = Client(app.url, verbose=False)
    _, answers, *_ = owner.predict("my own chat", "", *SAMPLING, api_name="/send")
    turn = store.get_turn(answers[0]["turn_id"])
    assert turn.user_id.startswith("anon:") and turn.session_id == owner.session_hash
    assert turn.may_train is False, "an anonymous visitor's turn does not train in public"

    # Someone else's session id, with the stranger's own (valid) cookie.
    stranger = visitor(app.url)
    for name, data in (("vote", [-1, "dislike"]), ("rewrite", [-1, "pwned"]), ("undo", [])):
        _, kind, payload = http_call(stranger, name, data, owner.session_hash)
        assert kind == "error" and "belongs to another browser" in payload, name
    # A cookie this server never signed.
    forged = httpx.Client(base_url=app.url.rstrip("/"), timeout=60)
    forged.cookies.set(access.COOKIE, "0" * 32 + "." + "f" * 32)
    _, kind, payload = http_call(forged, "vote", [-1, "dislike"], owner.session_hash)
    assert kind == "error" and "not issued by this server" in payload
    assert list(store.events()) == [], "no refused call may write an event"
    # The owner's chat is untouched and still works.
    _, answers, _ = owner.predict(-1, "like", api_name="/vote")
    assert answers[0]["vote"] == "like"

    # Signed in through the proxy's header: the account is the user id, and it trains.
    alice = Client(app.url, verbose=False, headers={"X-Forwarded-User": "alice"})
    _, answers, *_ = alice.predict("hello", "", *SAMPLING, api_name="/send")
    turn = store.get_turn(answers[0]["turn_id"])
    assert turn.user_id == "alice" and turn.may_train is True


def test_gradios_session_routes_refuse_someone_elses_chat(serve_app):
    # Review of s24: Gradio's routes that take a session hash and run no handler of ours
    # answered anyone who named one (a turns export lists them): GET /gradio_api/queue/data
    # streamed that chat's updates, its whole text, to the stranger (and took them from
    # its owner), and closing it, or a heartbeat, or POST /gradio_api/cancel, stopped the
    # owner's answer. Now each is refused unless the cookie owns the chat.
    app = serve_app(**PUBLIC)
    owner = Client(app.url, verbose=False)
    owner.predict("my own chat", "", *SAMPLING, api_name="/send")
    chat = owner.session_hash
    stranger = visitor(app.url)
    with answer_streaming(app, owner) as job:
        with stranger.stream(
            "GET", "/gradio_api/queue/data", params={"session_hash": chat}, timeout=10
        ) as reply:
            assert reply.status_code == 404, next(reply.iter_lines(), "")
            assert "belongs to another browser" in reply.read().decode()
        reply = stranger.get(f"/gradio_api/heartbeat/{chat}", timeout=10)
        assert reply.status_code == 404 and "belongs to another browser" in reply.text
        # Final review of s25: Gradio's deep link saved the chat's shown values to disk for
        # whoever named it, and /?deep_link=<hash> showed them.
        reply = stranger.get("/gradio_api/deep_link", params={"session_hash": chat}, timeout=10)
        assert reply.status_code == 404 and "no shareable links" in reply.text
        fn_index = next(d["id"] for d in stranger.get("/config").json()["dependencies"]
                        if d.get("api_name") == "send")  # fmt: skip
        body = {"session_hash": chat, "fn_index": fn_index, "event_id": "x"}
        reply = stranger.post("/gradio_api/cancel", json=body)
        assert reply.status_code == 404 and "belongs to another browser" in reply.text
        chat_shown = job.result(timeout=120)[0]
    assert len(chat_shown) == 4 and chat_shown[-1]["role"] == "assistant"
    assert app.service.store.counts()["turns"] == 2, "the owner's answer was stored"
    # A chat nobody owns yet, and one's own, still work as Gradio's client uses them.
    assert stranger.post("/gradio_api/cancel", json={**body, "session_hash": "fresh"}).is_success
    owner.predict(-1, "like", api_name="/vote")


def test_rate_limits_and_body_size_over_http(serve_app):
    app = serve_app(**PUBLIC, message_rate="2/hour", feedback_rate="3/hour", max_body_kb=64)
    client = Client(app.url, verbose=False)
    for i in range(2):
        client.predict(f"question {i}", "", *SAMPLING, api_name="/send")
    with pytest.raises(AppError, match=r"Too many messages.*Try again in \d+ (s|minutes)"):
        client.predict("one too many", "", *SAMPLING, api_name="/send")
    for kind in ("like", "dislike", "like"):
        client.predict(-1, kind, api_name="/vote")
    with pytest.raises(AppError, match="Too many reactions"):
        client.predict(-1, "dislike", api_name="/vote")
    assert len(list(app.service.store.events())) == 3
    # The chat's training switch counts as a reaction: each switch writes every turn of
    # the chat and resets the leaderboard's cache (review of s13: it was not counted).
    other = Client(app.url, verbose=False)
    for value in (True, False, True):
        other.predict(value, api_name="/set_no_train")
    with pytest.raises(AppError, match="Too many reactions"):
        other.predict(False, api_name="/set_no_train")
    # A body over RLHF_MAX_BODY_KB is refused before Gradio parses it.
    stranger = visitor(app.url)
    status, _, payload = http_call(stranger, "send", ["x" * 70_000, "", *SAMPLING], "big")
    assert status == 413 and "RLHF_MAX_BODY_KB" in payload["detail"]


def test_joins_nobody_reads_do_not_pile_up_in_gradios_queue(serve_app):
    # Review of s13: each POST /gradio_api/call/NAME left a record in Gradio's queue until its
    # results were read (200 unread joins with fresh session hashes: +200 records, for good),
    # and every GET /call/NAME/<id> scans those records on the event loop.
    app = serve_app(**PUBLIC, session_rate_ip="1000/minute")
    queue = app.demo._queue
    queue.pending_messages_per_session.max_size = 20  # Gradio's 2000, made small to test
    stranger = visitor(app.url)
    for i in range(200):
        response = stranger.post("/gradio_api/call/vote",
                                 json={"data": [-1, "like"], "session_hash": f"h{i}"})  # fmt: skip
        assert response.status_code == 200
    assert len(queue.pending_event_ids_session) <= 20 + 64  # access.PRUNE_EVERY_JOINS
    # Someone who reads their results still gets them.
    status, kind, _ = http_call(stranger, "new_chat", [], "reader")
    assert (status, kind) == (200, "complete")


def test_a_flood_of_new_sessions_does_not_cut_off_a_streaming_answer(serve_app):
    # Review of s23: Gradio keeps each session's messages in an LRU of 2000 sessions that
    # drops the oldest first, and every join with a fresh session hash adds one before any
    # handler runs. 2000 refused joins from one address pushed every streaming chat out:
    # its stream read 404 and the answer was lost. Now an idle session goes first.
    app = serve_app(**PUBLIC, session_rate_ip="1000/minute")
    app.demo._queue.pending_messages_per_session.max_size = 20  # Gradio's 2000, made small

    with answer_streaming(app, Client(app.url, verbose=False)) as job:  # the flood comes now
        stranger = visitor(app.url)
        for i in range(60):
            flood = {"data": [-1, "like"], "session_hash": f"f{i}"}
            response = stranger.post("/gradio_api/call/vote", json=flood)
            assert response.status_code == 200
        assert not job.done(), "the flood should arrive while the answer streams"
        chat = job.result()[0]
    assert [m["role"] for m in chat] == ["user", "assistant"]
    assert len(list(app.service.store.turns())) == 1  # the answer was written and stored


def test_a_stranger_cannot_upload_files(serve_app):
    # Review of s13: Gradio's upload route took any file from anyone (30 of 200 KB in a row)
    # and served it back: a free file host on a public Space. No component here takes files.
    app = serve_app(**PUBLIC)
    stranger = visitor(app.url)
    for path in ("/gradio_api/upload", "/gradio_api/upload/", "/gradio_api/process_recording"):
        response = stranger.post(path, files={"files": ("a.txt", b"x" * 1000, "text/plain")})
        assert response.status_code == 404, response.text
        assert "takes no files" in response.json()["detail"]
    # The page and its chat still work.
    assert stranger.get("/").status_code == 200
    status, kind, _ = http_call(stranger, "new_chat", [], "u1")
    assert (status, kind) == (200, "complete")


def test_upload_progress_polls_do_not_grow_memory(serve_app):
    # Review of s24: GET /gradio_api/upload_progress?upload_id=ID (Gradio's progress of an
    # upload, which nothing here takes) kept an asyncio.Event for every id ever asked about,
    # for good, and held the request 3 s first: a stranger grew the UI's memory by one entry
    # (its id up to the URL limit, ~16 KB) per request, from any number of connections.
    from gradio.routes import file_upload_statuses

    app = serve_app(**PUBLIC)
    stranger = visitor(app.url)
    before = len(file_upload_statuses._signals)

    def poll(i: int) -> int:
        path = f"/gradio_api/upload_progress?upload_id={i:04d}{'x' * 4000}"
        return stranger.get(path).status_code

    with ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(poll, range(16)))
    assert len(file_upload_statuses._signals) == before, "each poll left an entry behind"
    assert set(codes) == {404}, codes
    # The page and its chat still work.
    status, kind, _ = http_call(stranger, "new_chat", [], "u1")
    assert (status, kind) == (200, "complete")


def test_fresh_session_ids_do_not_fill_gradios_state_store(serve_app, monkeypatch):
    # Review of s24: Gradio builds a per-session copy of every component's config (~160 KB
    # here) for each session id it has not seen, before any handler of ours runs, and keeps
    # up to 10,000 of them: POST /gradio_api/component_server (a route for components with
    # server functions, of which this page has none) with a fresh id each time, or a
    # handler call refused for "too many new chats", grew the UI by ~1.6 GB, from one
    # address, unchecked. Now component_server is refused, and the store is small.
    import gc
    import tracemalloc

    monkeypatch.setattr(access, "GRADIO_SESSION_STATES", 5, raising=False)  # small, to test
    app = serve_app(**PUBLIC, session_rate_ip="5/minute")
    store = app.demo.state_holder
    stranger = visitor(app.url)
    config = stranger.get("/config").json()
    (sync,) = [d["id"] for d in config["dependencies"] if d.get("api_name") == "sync_feedback"]

    def flood(prefix: str, n: int) -> None:
        for i in range(n):
            body = {"session_hash": f"{prefix}c{i}", "component_id": 9, "fn_name": "x",
                    "data": None}  # fmt: skip
            assert stranger.post("/gradio_api/component_server", json=body).status_code == 404
            body = {"fn_index": sync, "data": [], "session_hash": f"{prefix}r{i}"}
            stranger.post("/gradio_api/run/predict", json=body)

    flood("warm", 40)  # what a first request loads and caches (imports, source lines)
    tracemalloc.start()
    try:
        gc.collect()
        before = tracemalloc.get_traced_memory()[0]
        flood("", 60)
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert len(store.session_data) <= 5, len(store.session_data)
    assert grown < 2_000_000, f"120 refused requests kept {grown / 1e6:.1f} MB"
    # The page and its chat still work.
    status, kind, _ = http_call(stranger, "new_chat", [], "warmr0")
    assert (status, kind) == (200, "complete")


def test_gradios_traffic_monitoring_is_off(serve_app, capsys):
    # Review of s24: Gradio's monitoring is on unless switched off. GET /monitoring/summary
    # gave anyone every handler's request count, success rate and timings (how many people
    # delete their data, pick in the arena...), and each GET /monitoring printed the key of
    # the dashboard, which lists every event with its session id, to the log.
    app = serve_app(**PUBLIC)
    stranger = visitor(app.url)
    status, kind, _ = http_call(stranger, "new_chat", [], "m1")
    assert (status, kind) == (200, "complete")
    assert stranger.get("/monitoring/summary").status_code == 403
    assert stranger.get("/monitoring").status_code == 403
    assert "/monitoring/" not in capsys.readouterr().out


def test_gradios_run_history_is_off(serve_app, monkeypatch):
    # Review of s22: Gradio 6 records every call of a signed-in visitor into a Hugging Face
    # bucket the request names (header x-gradio-history-bucket), fetching each {"url": ...}
    # of the raw request into memory first (up to 64 MB each, before any of our limits); and
    # by default it keeps every run, chats included, in the browser, where "Delete my data"
    # cannot reach. A chat service has no use for either.
    import gradio.history

    recorded = []

    def build(*args, **kwargs):
        recorded.append(args)
        raise ValueError("the test stops here")  # resolve_target: "ignoring invalid bucket"

    monkeypatch.setattr(gradio.history, "resolve_token", lambda request: "hf_signed_in")
    monkeypatch.setattr(gradio.history.HistoryTarget, "build", build)
    app = serve_app(**PUBLIC)
    client = Client(app.url, verbose=False, headers={"x-gradio-history-bucket": "me/runs"})
    client.predict("hello", "", *SAMPLING, api_name="/send")
    client.predict(api_name="/new_chat")  # the recorder's task runs on the loop meanwhile
    time.sleep(0.5)
    assert recorded == [], "a run was handed to Gradio's run history"
    stranger = visitor(app.url)
    assert stranger.get("/gradio_api/runs").status_code == 404
    assert stranger.post("/gradio_api/run-history/connect", json={}).status_code in (404, 405)


def test_one_address_cannot_hold_every_answer_slot(serve_app):
    # Review of s13: a chat answers one message at a time, but new chats are cheap, so one
    # address with 16 chats held every decode slot and everyone else waited in the queue.
    app = serve_app(**PUBLIC, answers_in_flight=2)
    app.service.arena_versions = lambda: (0, 0)  # two "versions" the tiny model serves
    chats = [Client(app.url, verbose=False) for _ in range(3)]  # 3 cookies, 1 address
    policy = app.service.policy
    policy._generate_lock.acquire()  # no decode step runs: answers stay in flight
    try:
        jobs = [c.submit(f"q{i}", "", *SAMPLING, api_name="/send") for i, c in
                enumerate(chats[:2])]  # fmt: skip
        wait_for(lambda: all(app.service.session(c.session_hash).answering for c in chats[:2]),
                 30, "two answers in flight")  # fmt: skip
        # (submit with a timeout: a request let through would wait for the held lock)
        with pytest.raises(AppError, match="2 answers are already being written for this "
                           "address.*Wait for one to finish"):  # fmt: skip
            chats[2].submit("a third at once", "", *SAMPLING, api_name="/send").result(30)
        with pytest.raises(AppError, match="already being written"):
            chats[2].submit("an arena", "", *SAMPLING, api_name="/arena_send").result(30)
    finally:
        policy._generate_lock.release()
    for job in jobs:
        job.result(timeout=60)
    # Their slots came back when the answers ended: the third chat sends now.
    chats[2].predict("now", "", *SAMPLING, api_name="/send")


def test_one_address_cannot_fill_the_shared_queue(serve_app, monkeypatch):
    # Review of s23: Gradio's queue (RLHF_MAX_QUEUE) is one for everyone. While the answer
    # slots were busy, one script's sends, reposted as they drained, filled it, and every
    # other visitor's vote, rewrite and message was refused as "busy". Now one address has at
    # most WAITING_PER_ADDRESS requests waiting.
    monkeypatch.setattr(access, "WAITING_PER_ADDRESS", 3)
    app = serve_app(**PUBLIC, client_ip_header="X-Forwarded-For", serving_backend="sequential",
                    max_queue=8)  # fmt: skip
    victim = Client(app.url, verbose=False, headers={"X-Forwarded-For": "198.51.100.7"})
    policy = app.service.policy
    policy._generate_lock.acquire()  # the one answer slot stays busy: sends wait in the queue
    try:
        job = victim.submit("hello", "", *SAMPLING, api_name="/send")
        wait_for(lambda: app.service.session(victim.session_hash).answering, 30, "an answer")
        attacker = visitor(app.url)
        attacker.headers["X-Forwarded-For"] = "203.0.113.5"
        codes, detail = [], ""
        for i in range(6):
            body = {"data": [f"q{i}", "", *SAMPLING], "session_hash": f"a{i}"}
            response = attacker.post("/gradio_api/call/send", json=body)
            codes.append(response.status_code)
            detail = response.json().get("detail", "") if response.status_code != 200 else detail
        assert codes == [200, 200, 200, 429, 429, 429]
        assert detail.startswith("Too many of your requests are waiting")
        # Sent all at once, from another address: still no more than 3 get in (each is
        # counted from the moment it arrives, not once Gradio has queued it).
        burst = visitor(app.url)
        burst.headers["X-Forwarded-For"] = "203.0.113.77"
        cookies = dict(burst.cookies)

        def join(i: int) -> int:
            with httpx.Client(base_url=app.url.rstrip("/"), cookies=cookies, timeout=60,
                              headers={"X-Forwarded-For": "203.0.113.77"}) as http:  # fmt: skip
                body = {"data": [f"b{i}", "", *SAMPLING], "session_hash": f"b{i}"}
                return http.post("/gradio_api/call/send", json=body).status_code

        with ThreadPoolExecutor(8) as pool:
            burst_codes = sorted(pool.map(join, range(8)))
        assert burst_codes.count(200) <= 3 and set(burst_codes) <= {200, 429}, burst_codes
        # Another address is still let in: its vote is not refused as busy.
        other = visitor(app.url)
        other.headers["X-Forwarded-For"] = "192.0.2.9"
        response = other.post("/gradio_api/call/vote",
                              json={"data": [-1, "like"], "session_hash": "o1"})  # fmt: skip
        assert response.status_code == 200, response.text
    finally:
        policy._generate_lock.release()
    job.result(timeout=60)


def test_an_answer_cancelled_before_its_first_token_does_not_hold_its_chat(serve_app, monkeypatch):
    # Found with the test above: a request cancelled (gradio_client's cancel) while its first
    # decode step waited was never closed by Gradio, so the chat refused every later message
    # ("still being written") for good. Now the chat and the caller's slot come back.
    monkeypatch.setattr(access, "ABANDONED_AFTER_S", 1.0)
    app = serve_app(**PUBLIC, answers_in_flight=1)
    chat = Client(app.url, verbose=False)
    session = app.service.session(chat.session_hash)
    policy = app.service.policy
    policy._generate_lock.acquire()
    try:
        job = chat.submit("to be cancelled", "", *SAMPLING, api_name="/send")
        wait_for(lambda: session.streaming is not None, 30, "the answer in flight")
        job.cancel()
    finally:
        policy._generate_lock.release()
    wait_for(lambda: not session.answering, 30, "the chat free again")
    # The chat answers again, and the slot (1 per caller here) was given back.
    chat.predict("again", "", *SAMPLING, api_name="/send")
    other = Client(app.url, verbose=False)
    other.predict("from the same address", "", *SAMPLING, api_name="/send")


def test_an_answer_nobody_reads_lets_go_of_its_chat_slot_and_decode(serve_app, monkeypatch):
    # What frees the chat above, driven by hand: a handler left at a yield (nobody pulls its
    # updates) for ABANDONED_AFTER_S is let go; one waiting for the model never is.
    import threading

    app = serve_app(**PUBLIC, answers_in_flight=1)
    service, policy = app.service, app.service.policy
    caller = Identity(user_id="anon:c", account=None, session_id="s1", ip="203.0.113.7")
    slot = app.access.take_answer_slot(caller)
    updates = service.send("s1", "hello", None, {"max_new_tokens": 64}, admit=lambda: slot)
    next(updates)  # the handler now sits at its first yield, as a cancelled one did
    session = service.session("s1")
    gen = session.streaming["gen"]
    assert session.answering
    with pytest.raises(access.TooManyAnswers):
        app.access.take_answer_slot(caller)
    slot._paused_at -= access.ABANDONED_AFTER_S + 1  # as if nobody had pulled it since
    assert not session.answering
    app.access.take_answer_slot(caller).release()  # its slot no longer counts
    list(service.send("s1", "again", None, {"max_new_tokens": 4}))  # the chat answers
    assert gen._cancel.is_set()  # and the abandoned answer's decode was stopped
    # Were the first handler pulled again after all, it would not save its cut answer.
    with pytest.raises(InputError, match="This answer was stopped"):
        list(updates)
    assert [m["content"] for m in service.session("s1").messages if m["role"] == "user"] == [
        "again"
    ]

    # A handler waiting for the model (here: for the decode lock) is running, not paused.
    monkeypatch.setattr(access, "ABANDONED_AFTER_S", 0.5)
    policy._generate_lock.acquire()
    try:
        waiting = threading.Thread(target=lambda: list(service.send("s2", "hi", None, {})))
        waiting.start()
        wait_for(lambda: service.session("s2").streaming is not None, 30, "the answer begun")
        time.sleep(1.0)
        assert service.session("s2").answering
    finally:
        policy._generate_lock.release()
    waiting.join(timeout=60)
    assert not service.session("s2").answering


def test_an_arena_message_counts_as_the_two_answers_it_asks_for(serve_app):
    # Review 1 of s11: an arena message generates two answers but counted as one message,
    # so the arena doubled what RLHF_MESSAGE_RATE lets one person make the server write.
    app = serve_app(**PUBLIC, message_rate="3/hour")
    client = Client(app.url, verbose=False)
    # Review s12: refused for want of a second version, it is not counted at all.
    with pytest.raises(AppError, match="only one so far"):
        client.predict("Which is better?", "", *SAMPLING, api_name="/arena_send")
    app.service.arena_versions = lambda: (0, 0)  # two "versions" the tiny model serves
    client.predict("Which is better?", "", *SAMPLING, api_name="/arena_send")
    client.predict("question 1", "", *SAMPLING, api_name="/send")
    with pytest.raises(AppError, match=r"Too many messages: .* at most 3 per hour"):
        client.predict("question 2", "", *SAMPLING, api_name="/send")


def test_a_refused_message_uses_none_of_the_rate_window(serve_app):
    # Review s12: the message rate was counted before the request was checked, so a second
    # Enter while an answer streamed (refused: one answer at a time), an empty message or a
    # regenerate of nothing each used up one of the person's messages.
    app = serve_app(**PUBLIC, message_rate="2/hour")
    client = Client(app.url, verbose=False)
    with pytest.raises(AppError, match="not a finished answer of this chat"):
        client.predict(-1, *SAMPLING, api_name="/regenerate")
    with pytest.raises(AppError, match="empty"):
        client.predict("   ", "", *SAMPLING, api_name="/send")
    client.predict("question 1", "", *SAMPLING, api_name="/send")
    session = app.service.session(client.session_hash)
    session.streaming = {"index": 2, "votes": [], "slot": access.AnswerSlot(), "gen": None}
    for _ in range(2):
        with pytest.raises(AppError, match="still being written"):
            client.predict("question 2", "", *SAMPLING, api_name="/send")
    session.streaming = None
    client.predict("question 2", "", *SAMPLING, api_name="/send")
    with pytest.raises(AppError, match=r"Too many messages: .* at most 2 per hour"):
        client.predict("question 3", "", *SAMPLING, api_name="/send")


def test_an_arena_message_over_the_whole_message_rate_says_so(serve_app):
    # Review s12: with RLHF_MESSAGE_RATE of one per window an arena message (two answers)
    # can never be taken; "try again in N s" would send the person back to wait for nothing.
    app = serve_app(**PUBLIC, message_rate="1/hour")
    app.service.arena_versions = lambda: (0, 0)
    client = Client(app.url, verbose=False)
    with pytest.raises(AppError, match=r"asks for 2 answers at once.*Chat in the Chat tab"):
        client.predict("Which is better?", "", *SAMPLING, api_name="/arena_send")
    client.predict("question 1", "", *SAMPLING, api_name="/send")


def test_status_names_a_local_model_folder_by_its_last_part_only(serve_app):
    # Review 1 of s11: /status gave anyone RLHF_BASE_MODEL as set, a local path when one
    # is (how the operator's disks are laid out); visitors now get the folder's name.
    app = serve_app(**PUBLIC)
    app.service.settings = app.service.settings.model_copy(
        update={"base_model": "/srv/operator/models/SmolLM2-135M-Instruct"}
    )
    status = Client(app.url, verbose=False).predict(api_name="/status")
    assert status["model"] == "SmolLM2-135M-Instruct"
    admin = Client(app.url, verbose=False, headers={"X-Forwarded-User": "root"})
    assert (
        admin.predict(api_name="/status")["model"] == "/srv/operator/models/SmolLM2-135M-Instruct"
    )


def test_public_model_name():
    from chat_ui.app import public_model_name

    assert public_model_name("HuggingFaceTB/SmolLM2-135M-Instruct") == (
        "HuggingFaceTB/SmolLM2-135M-Instruct"
    )
    assert public_model_name("/models/smol/") == "smol"
    assert public_model_name("./models/smol") == "smol"
    assert public_model_name("~/models/smol") == "smol"
    assert public_model_name("tiny-random") == "tiny-random"


def test_an_anonymous_visitor_cannot_switch_training_on_in_public(serve_app):
    # Review s12: the chat switch set later won over the turn's own flag, so an anonymous
    # visitor of a public UI (whose turns may not train) switched "Don't use this chat for
    # training" on and off again, and the chat trained: a flood needed no account.
    app = serve_app(**PUBLIC)
    store, settings = app.service.store, app.settings
    stranger = Client(app.url, verbose=False)
    stranger.predict("train on me", "", *SAMPLING, api_name="/send")
    stranger.predict(-1, "like", api_name="/vote")
    stranger.predict(True, api_name="/set_no_train")
    stranger.predict(False, api_name="/set_no_train")
    stranger.predict("and on me", "", *SAMPLING, api_name="/send")
    stranger.predict(-1, "like", api_name="/vote")
    assert ds.export_rows(store, "turns", settings=settings) == []
    assert ds.export_rows(store, "kto", settings=settings) == []
    # A signed-in person's chat switched off and on again trains, earlier answers too.
    alice = Client(app.url, verbose=False, headers={"X-Forwarded-User": "alice"})
    alice.predict("mine", "", *SAMPLING, api_name="/send")
    alice.predict(-1, "like", api_name="/vote")
    alice.predict(True, api_name="/set_no_train")
    assert ds.export_rows(store, "kto", settings=settings) == []
    alice.predict(False, api_name="/set_no_train")
    assert len(ds.export_rows(store, "kto", settings=settings)) == 1


def test_new_chats_from_one_address_are_bounded(serve_app, redis_client):
    # Review s11: every request with a chat id never seen before bound it (a key kept for
    # a week) and opened a chat in memory, without any window: /status with a new id per
    # call grew Redis and the UI's sessions without bound.
    app = serve_app(**PUBLIC, session_rate_ip="5/minute")
    stranger = visitor(app.url)
    for n in range(5):
        _, kind, payload = http_call(stranger, "status", [], f"flood-{n}")
        assert kind == "complete", payload
    for n in range(5, 8):
        _, kind, payload = http_call(stranger, "status", [], f"flood-{n}")
        assert kind == "error" and "Too many new chats" in payload and "Try again in" in payload
    assert len(redis_client.keys(access.BIND_PREFIX + "flood-*")) == 5
    assert not any(f"flood-{n}" in app.service._sessions for n in range(5, 8))
    _, kind, _ = http_call(stranger, "status", [], "flood-0")  # a known chat goes on
    assert kind == "complete"


def test_queued_handlers_cannot_skip_the_queue(serve_app):
    # Review s11: off a Space Gradio leaves POST /run/<name> open, which ran /send directly,
    # past the queue's concurrency limit and RLHF_MAX_QUEUE.
    app = serve_app(**PUBLIC)
    stranger = visitor(app.url)
    reply = stranger.post(
        "/gradio_api/run/send", json={"data": ["hi", "", *SAMPLING], "session_hash": "direct"}
    )
    assert reply.status_code == 404 and "join the queue" in reply.json()["detail"]
    assert app.service.store.counts()["turns"] == 0
    _, kind, payload = http_call(stranger, "send", ["hi", "", *SAMPLING], "queued")
    assert kind == "complete", payload  # through the queue it answers


def test_delete_my_data_covers_what_the_browser_wrote_before_signing_in(serve_app):
    # Review s11: the deletion took only the signed-in account's data; the turns the same
    # browser wrote anonymously just before signing in (anon:<cookie id>) stayed stored.
    app = serve_app(**PUBLIC)
    store = app.service.store
    alice = {"headers": {"X-Forwarded-User": "alice"}}
    browser, other = visitor(app.url), visitor(app.url)
    for http, session, kw in ((browser, "tab-1", {}), (other, "tab-2", {})):
        _, kind, payload = http_call(
            http, "send", ["before signing in", "", *SAMPLING], session, **kw
        )
        assert kind == "complete", payload
    _, kind, payload = http_call(browser, "send", ["signed in", "", *SAMPLING], "tab-1", **alice)
    assert kind == "complete", payload
    users = sorted(t.user_id for t in store.turns())
    assert users.count("alice") == 1 and len(users) == 3
    _, kind, payload = http_call(browser, "delete_my_data", [], "tab-1", **alice)
    assert kind == "complete", payload
    (left,) = store.turns()  # the other browser's
    assert left.user_id.startswith(access.ANON) and left.messages[-1]["content"] == (
        "before signing in"
    )


def queue_call(http, fn_index: int, data: list, session_hash: str, event_data=None) -> dict:
    """Run a handler by its index through the queue, as the page does (private handlers
    answer this way too): the process_completed message."""
    body = {"fn_index": fn_index, "data": data, "event_data": event_data,
            "session_hash": session_hash}  # fmt: skip
    http.post("/gradio_api/queue/join", json=body).raise_for_status()
    params = {"session_hash": session_hash}
    with http.stream("GET", "/gradio_api/queue/data", params=params) as stream:
        for line in stream.iter_lines():
            if line.startswith("data:"):
                message = json.loads(line[5:])
                if message.get("msg") == "process_completed":
                    return message
    raise AssertionError("the queue closed without a result")


def test_a_hand_made_like_event_gets_a_clear_answer(serve_app):
    # Review s11: the Chatbot's like handler looked its value up in a dict, so a request
    # with liked=[1] (a list) answered "Something went wrong (TypeError)".
    app = serve_app(**PUBLIC)
    stranger = visitor(app.url)
    _, kind, payload = http_call(stranger, "send", ["hi", "", *SAMPLING], "liker")
    assert kind == "complete", payload
    config = stranger.get("/config").json()
    (like,) = [d["id"] for d in config["dependencies"] if d.get("api_name") == "on_like"]
    for liked, vote in (([1], None), (True, "like"), ({"a": 1}, None)):
        event = {"index": [1, 0], "value": "x", "liked": liked}
        done = queue_call(stranger, like, [], "liker", event)
        assert done["success"], done
        assert app.service.view(app.service.session("liker"))[-1]["vote"] == vote


def test_a_full_queue_says_busy(serve_app):
    app = serve_app(**PUBLIC, max_queue=0)
    stranger = visitor(app.url)
    status, _, payload = http_call(stranger, "send", ["hi", "", *SAMPLING], "q1")
    assert status == 503 and "busy" in payload["detail"] and "Try again" in payload["detail"]


def test_a_flood_of_forged_accounts_cannot_fill_a_round(serve_app):
    """Twelve fresh cookies from one address (twelve 'accounts' for free): the per-IP
    window lets few reactions in, and in public none of them trains."""
    app = serve_app(**PUBLIC, feedback_rate_ip="4/hour", max_events_per_user=2)
    store = app.service.store
    refused = 0
    for i in range(12):
        bot = Client(app.url, verbose=False)  # a new cookie, a new session: a new "user"
        bot.predict(f"bot {i}", "", *SAMPLING, api_name="/send")
        try:
            bot.predict(-1, "like", api_name="/vote")
        except AppError as error:
            assert "Too many reactions" in str(error) and "address" in str(error)
            refused += 1
    events = list(store.events())
    assert len(events) == 4 and refused == 8
    # What got in never trains: not in a round, not in an export.
    entries = [(str(i), e) for i, e in enumerate(events)]
    data = round_datasets(store, entries, max_per_user=app.settings.max_events_per_user)
    assert data.pointwise == [] and data.pairs == [] and data.prompts == []
    assert data.heldout_pairs == [] and data.replay_pointwise == []
    assert load_feedback(store) == ([], [])
    assert store.counts()["turns"] == 12  # kept (the bots see their chats), not trained on


def test_with_anonymous_training_on_the_address_window_still_bounds_a_flood(
    serve_app, redis_client
):
    """The same flood with anonymous training on: each forged account is still held to
    the per-user cap, and the address window bounds how many accounts get in."""
    app = serve_app(
        **PUBLIC, anonymous_train=True, feedback_rate_ip="4/hour", max_events_per_user=1
    )
    for i in range(6):
        bot = Client(app.url, verbose=False)
        bot.predict(f"bot {i}", "", *SAMPLING, api_name="/send")
        for kind in ("like", "dislike"):
            try:
                bot.predict(-1, kind, api_name="/vote")
            except AppError:
                pass
    events = list(FeedbackStore(redis_client).events())
    assert len(events) == 4, "the address window lets 4 reactions in, whatever the accounts"
    # learn-data's window over rounds: each forged account keeps at most its budget.
    entries = [(str(i), e) for i, e in enumerate(events)]
    data = round_datasets(app.service.store, entries, max_per_user=1, window_rounds=3)
    per_user = {}
    for _, event in data.entries:
        per_user[event.user_id] = per_user.get(event.user_id, 0) + 1
    assert per_user and max(per_user.values()) <= 3 and sum(per_user.values()) <= 4


def test_compose_keeps_valkey_private_and_password_protected():
    import yaml

    compose = yaml.safe_load(
        open(os.path.join(os.path.dirname(__file__), "..", "docker-compose.yml"))
    )
    valkey = compose["services"]["redis"]
    assert "ports" not in valkey, "Valkey must not be published to the host"
    assert "--requirepass" in " ".join(valkey["command"])
    url = compose["x-rlhf-env"]["RLHF_REDIS_URL"]
    assert url.startswith("redis://:${RLHF_REDIS_PASSWORD:?")


def test_a_buffered_body_can_be_read_past_its_end():
    # Final review of s25: the middleware reads a chunked body (and every /cancel) before
    # the app, then hands it back through a replacement ``receive``, which called itself
    # once the body was read (a response that waits for the client to leave reads again):
    # RecursionError. Past the body, the server's own receive answers.
    import asyncio

    reads: list[dict] = []

    async def app(scope, receive, send):  # reads the body, then waits for a disconnect
        reads.append(await receive())
        reads.append(await receive())
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    server_messages = [
        {"type": "http.request", "body": b'{"a": 1}', "more_body": False},
        {"type": "http.disconnect"},
    ]

    async def receive():
        return server_messages.pop(0)

    async def send(message):
        pass

    middleware = access.BoundaryMiddleware(app, secret=b"k", max_body=1024, secure_cookie=False)
    scope = {"type": "http", "method": "POST", "path": "/gradio_api/anything", "headers": []}
    asyncio.run(middleware(scope, receive, send))
    assert reads == [
        {"type": "http.request", "body": b'{"a": 1}', "more_body": False},
        {"type": "http.disconnect"},
    ]
