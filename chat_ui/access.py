"""Who may do what, decided at the UI's boundary (rlhf_core stores user ids and never
sees a request).

The handlers in app.py call :meth:`Access.identify` first. It answers with an
:class:`Identity` or raises :class:`AccessError` with a message for the person:

- **The session is issued by the server.** Every HTTP response to a client without a
  valid ``rlhf_sid`` cookie sets one: a random id signed with a key kept in Redis
  (shared by every UI replica). Gradio's ``session_hash`` is chosen by the client, so
  the first request of a chat binds that hash to the cookie's id (``SET NX`` in
  Redis); a request naming a hash that is bound to another cookie (someone else's
  chat), or carrying a cookie this server did not sign, is refused. Browsers and
  ``gradio_client`` keep the cookie by themselves.
- **The account** comes from Hugging Face OAuth on a Space (``hf_oauth: true`` in
  the README metadata, ``gr.LoginButton``), from a trusted reverse-proxy header, or
  from Gradio's own login, by ``RLHF_AUTH``. Signed in, the account is the user id
  of turns and events; otherwise it is ``anon:`` plus the cookie's id.
- **Admins** (``RLHF_ADMINS``) may train, roll back and change what everyone gets.
  With none named, the local user is the admin when the UI listens on loopback and
  the request came straight from this machine (not through a proxy).
- **Rate limits** per account and per IP, moving windows in Redis through the
  ``limits`` library, so every replica counts the same clicks.

The ASGI middlewares at the bottom set the cookie, cap request bodies, refuse calls
by name to endpoints that are not meant for visitors, and turn Gradio's "queue is
full" into a message that says what to do.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import logging
import os
import re
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis
from starlette.requests import Request

from chat_ui import validation
from rlhf_core.settings import Settings, SettingsError

log = logging.getLogger(__name__)

COOKIE = "rlhf_sid"
COOKIE_MAX_AGE_S = 30 * 24 * 3600
SECRET_KEY = "rlhf:access:secret"
BIND_PREFIX = "rlhf:access:chat:"
BIND_TTL_S = 7 * 24 * 3600
ANON = "anon:"
_LOCAL_BINDINGS_MAX = 20_000

# Endpoints a visitor may call by name (/gradio_api/call/NAME and friends); every other
# handler is reachable only as the page itself calls it, and checks the caller anyway.
PUBLIC_ENDPOINTS = frozenset(
    {
        "send", "vote", "rewrite", "regenerate", "undo", "new_chat", "status",
        "arena_send", "arena_pick", "set_no_train", "delete_my_data",
    }
)  # fmt: skip
# Callable by name, refused at the handler unless the caller is an admin.
ADMIN_ENDPOINTS = frozenset(
    {
        "train_now", "rollback", "ab_promote", "ab_rollback", "ab_share",
        "review_list", "approve_rewrites", "drop_rewrites",
    }
)  # fmt: skip

NO_COOKIE = (
    "This request carries no session cookie. Open the page in a browser, or keep the "
    "cookies the server sets (gradio_client does), then try again."
)
BAD_COOKIE = (
    "Your session cookie was not issued by this server (or the server's key changed). "
    "Reload the page to get a new one."
)
FOREIGN_SESSION = "This chat session belongs to another browser. Reload the page to start your own."
NO_SESSION = "No session id: reload the page."
NOT_ADMIN = (
    "Only an admin can do this (accounts listed in RLHF_ADMINS). Sign in with an admin "
    "account, or ask one."
)
SIGN_IN_TO_CHAT = "Sign in to chat: this deployment does not take messages from anonymous visitors."
BUSY = (
    "The chat is busy right now: too many requests are waiting. Try again in a minute; "
    "nothing you wrote before was lost."
)
# Requests one address (an IPv6 /64) may have waiting in Gradio's queue at once. The queue
# (RLHF_MAX_QUEUE) is shared: 64 sends from one script, reposted as they drained, made every
# other visitor's vote, rewrite and message "busy". A page has one or two waiting at most.
WAITING_PER_ADDRESS = 8
# Password tries (RLHF_AUTH=gradio's POST /login) from one address (an IPv6 /64), right or
# wrong: Gradio takes any number, as fast as they come, so an admin's password could be
# guessed. A person signs in a few times a day. Per address, not per account name: a
# window per name would let a stranger keep the admin out.
LOGIN_RATE_IP = "10/minute;100/day"
LOGIN_PATHS = frozenset({"/login"})
WAITING_TOO_MANY = (
    "Too many of your requests are waiting for the chat already. Wait for them to finish, "
    "then try again; nothing you wrote before was lost."
)


class AccessError(PermissionError):
    """The caller may not do this; the message says why and what to do."""


class RateLimited(AccessError):
    """Too many requests in a window; the message says when to try again, and
    ``retry_after_s`` (None: no wait will do) the same in seconds, for a Retry-After."""

    def __init__(self, message: str, retry_after_s: int | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class TooManyAnswers(AccessError):
    """The caller already has as many answers being written as one caller may."""


# An answer whose handler has sat at a yield this long is one nobody reads any more: Gradio
# pulls a streaming handler's updates as fast as they come (it does not wait for the page), so
# a handler left suspended is one whose request was cancelled without its generator being
# closed (a cancel during the first step did that: it never was), and its chat and its
# caller's slot are freed, its decode cancelled. A handler waiting for the model (a long
# prefill, a queue, text the detokenizer holds back) is running, not suspended: never dropped.
# Five minutes: well past any wait for one of Gradio's worker threads, short enough that a
# tab whose request was cancelled that way chats again soon.
ABANDONED_AFTER_S = 300.0


class AnswerSlot:
    """One answer in flight (:meth:`Access.take_answer_slot`; unlimited callers get one that
    counts nowhere). Its handler calls ``paused`` before each yield and ``resumed`` after;
    ``release`` once when it ends (again is harmless)."""

    def __init__(self, release: Callable[[AnswerSlot], None] | None = None) -> None:
        self._release = release
        self._paused_at: float | None = None

    def paused(self) -> None:
        self._paused_at = time.monotonic()

    def resumed(self) -> None:
        self._paused_at = None

    def abandoned(self, now: float) -> bool:
        paused_at = self._paused_at
        return paused_at is not None and now - paused_at > ABANDONED_AFTER_S

    def release(self) -> None:
        release, self._release = self._release, None
        if release is not None:
            release(self)


# ------------------------------------------------------------------ settings, read


def on_space() -> bool:
    """Running as a Hugging Face Space (the platform sets SPACE_ID)."""
    return bool(os.environ.get("SPACE_ID"))


def auth_mode(settings: Settings) -> str:
    if settings.auth == "auto":
        return "hf" if on_space() else "none"
    return settings.auth


def check_sign_in(settings: Settings) -> None:
    """Refuse a sign-in that anyone could fake. Off a Space, Gradio mocks Hugging Face
    sign-in: whoever clicks it becomes the account the machine is logged in with, and
    its session cookie is signed with a constant from Gradio's source, so a stranger
    signs one naming any account (an admin's). Fine on your own machine, never public."""
    if auth_mode(settings) == "hf" and not on_space() and is_public(settings):
        raise SettingsError(
            "RLHF_AUTH=hf works only on a Hugging Face Space (with hf_oauth: true): "
            "elsewhere Gradio fakes the sign-in, and anyone could sign in as any account, "
            "an admin's included. Off a Space use RLHF_AUTH=header behind a proxy that "
            "signs people in, or RLHF_AUTH=gradio."
        )


def is_loopback(host: str | None) -> bool:
    if not host:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def is_public(settings: Settings) -> bool:
    """Strangers can reach this UI: everything here defaults to its careful setting."""
    if settings.public is not None:
        return settings.public
    return not is_loopback(settings.host)


def admin_accounts(settings: Settings) -> frozenset[str]:
    return frozenset(a.strip() for a in settings.admins.split(",") if a.strip())


def anonymous_may_train(settings: Settings) -> bool:
    if settings.anonymous_train is not None:
        return settings.anonymous_train
    return not is_public(settings)


def gradio_auth(settings: Settings) -> list[tuple[str, str]] | None:
    """``launch(auth=...)`` pairs for RLHF_AUTH=gradio."""
    if auth_mode(settings) != "gradio":
        return None
    pairs = []
    for item in settings.auth_users.split(","):
        name, sep, password = item.strip().partition(":")
        if item.strip() and (not sep or not name or not password):
            raise SettingsError(
                f"RLHF_AUTH_USERS entry {item.strip()!r} is not 'name:password'; "
                "write the pairs comma-separated."
            )
        if item.strip():
            pairs.append((name, password))
    if not pairs:
        raise SettingsError("RLHF_AUTH=gradio needs RLHF_AUTH_USERS='name:password,...'.")
    return pairs


# ------------------------------------------------------------------ identity


@dataclass(frozen=True)
class Identity:
    """The caller of one request."""

    user_id: str  # what turns and events carry: the account, or anon:<session cookie id>
    account: str | None  # signed-in account name, None when anonymous
    session_id: str  # the chat (Gradio's session_hash), bound to this browser's cookie
    ip: str
    admin: bool = False
    local: bool = False  # straight from this machine, to a UI that listens on loopback
    # What this browser's anonymous turns carry (anon:<session cookie id>), also when
    # signed in: "Delete my data" deletes what the person wrote before signing in too.
    browser_user: str = ""

    @property
    def signed_in(self) -> bool:
        return self.account is not None


def is_admin(account: str | None, settings: Settings, local: bool = False) -> bool:
    """Accounts in RLHF_ADMINS; with none named, the local user of a loopback UI."""
    admins = admin_accounts(settings)
    if account is not None and account in admins:
        return True
    return not admins and local and not is_public(settings)


def may_chat(identity: Identity, settings: Settings) -> bool:
    return identity.signed_in or identity.admin or settings.anonymous_chat


def may_train(identity: Identity, settings: Settings) -> bool:
    """Whether this person's turns and reactions may become training data."""
    return identity.signed_in or identity.admin or anonymous_may_train(settings)


def _header(request: Any, name: str) -> str | None:
    headers = getattr(request, "headers", None) or {}
    try:
        return headers.get(name.lower()) or headers.get(name)
    except AttributeError:
        return None


def _peer(request: Any) -> str:
    client = getattr(request, "client", None)
    host = getattr(client, "host", None) if client is not None else None
    if host is None and isinstance(client, dict):
        host = client.get("host")
    return str(host or "")


def _forwarded(request: Any) -> bool:
    return any(_header(request, h) for h in ("x-forwarded-for", "forwarded", "x-real-ip"))


def client_ip(request: Any, settings: Settings) -> str:
    """The visitor's address: the last hop a trusted proxy appended to its header
    (a client can put anything in front of it, not after it), else the TCP peer."""
    header = settings.client_ip_header or ("x-forwarded-for" if on_space() else "")
    if header:
        value = _header(request, header)
        if value:
            return value.split(",")[-1].strip()
    return _peer(request)


def address_block(ip: str) -> str:
    """The key of an address in the per-address rate windows: an IPv6 address counts as
    its /64 (a home line or a rented server is given a whole /64: 2^64 addresses to rotate
    through, one window each), an IPv4 address mapped into IPv6 as the IPv4 address,
    anything else as given."""
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return ip or "?"
    if address.version == 6:
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.ip_network(f"{address}/64", strict=False))
    return str(address)


def _oauth_username(request: Any) -> str | None:
    underlying = getattr(request, "request", None) or request
    scope = getattr(underlying, "scope", None)
    session = scope.get("session", {}) if isinstance(scope, dict) else {}
    if not session:
        session = getattr(underlying, "session", None) or {}
    info = session.get("oauth_info") if hasattr(session, "get") else None
    if not info:
        return None
    expires_at = info.get("expires_at")
    if expires_at is not None and expires_at < time.time():
        return None
    userinfo = info.get("userinfo") or {}
    return userinfo.get("preferred_username") or None


def account_of(request: Any, settings: Settings) -> str | None:
    """The signed-in account of a request, by RLHF_AUTH; None when anonymous."""
    mode = auth_mode(settings)
    if mode == "hf":
        name = _oauth_username(request)
    elif mode == "header":
        name = _header(request, settings.auth_header)
    elif mode == "gradio":
        name = getattr(request, "username", None)
    else:
        name = None
    name = name.strip() if isinstance(name, str) else None
    # "anon:" ids are ours; an account must never be mistaken for one.
    if not name or name.startswith(ANON) or len(name) > 200:
        return None
    return name


def sign(secret: bytes, sid: str) -> str:
    mac = hmac.new(secret, sid.encode(), hashlib.sha256).hexdigest()[:32]
    return f"{sid}.{mac}"


def verify(secret: bytes, value: str | None) -> str | None:
    """The session id inside a cookie value this server signed, else None."""
    if not value or not isinstance(value, str) or "." not in value or len(value) > 200:
        return None
    sid, mac = value.rsplit(".", 1)
    if not re.fullmatch(r"[0-9a-f]{32}", sid):
        return None
    if not hmac.compare_digest(sign(secret, sid), value):
        return None
    return sid


def new_cookie_value(secret: bytes) -> str:
    return sign(secret, secrets.token_hex(16))


def load_secret(client: redis.Redis, settings: Settings) -> bytes:
    """The key that signs session cookies: RLHF_SESSION_SECRET, else one random key in
    Redis that the first replica creates and every other one reads."""
    if settings.session_secret:
        return settings.session_secret.encode()
    client.set(SECRET_KEY, secrets.token_hex(32), nx=True)
    value = client.get(SECRET_KEY)
    return value if isinstance(value, bytes) else str(value).encode()


# ------------------------------------------------------------------ the gate


def _items(spec: str, name: str) -> list[Any]:
    from limits import parse_many

    try:
        return parse_many(spec) if spec and spec.strip() else []
    except ValueError as error:
        raise SettingsError(
            f"RLHF_{name.upper()}={spec!r} is not a rate: write it like '20/minute;300/day' "
            "(empty = no limit)."
        ) from error


class Access:
    """Identity, admin checks and rate limits for one UI process."""

    def __init__(self, settings: Settings, client: redis.Redis, url: str | None = None) -> None:
        from limits.storage import RedisStorage
        from limits.strategies import MovingWindowRateLimiter

        self.settings = settings
        self.client = client
        self.secret = load_secret(client, settings)
        # The store's connection pool: one set of connections, the same timeouts.
        storage = RedisStorage(
            url or "redis://", connection_pool=client.connection_pool, key_prefix="rlhf:limits"
        )
        self.limiter = MovingWindowRateLimiter(storage)
        self.limits = {
            ("message", "account"): _items(settings.message_rate, "message_rate"),
            ("message", "ip"): _items(settings.message_rate_ip, "message_rate_ip"),
            ("feedback", "account"): _items(settings.feedback_rate, "feedback_rate"),
            ("feedback", "ip"): _items(settings.feedback_rate_ip, "feedback_rate_ip"),
            ("session", "ip"): _items(settings.session_rate_ip, "session_rate_ip"),
            ("login", "ip"): _items(LOGIN_RATE_IP, "login_rate_ip"),
        }
        self._answering: dict[str, set[AnswerSlot]] = {}  # answers in flight, per caller key
        # Bindings this process has seen: a known chat keeps working while Redis is down.
        self._bindings: OrderedDict[str, str] = OrderedDict()
        self._lock = threading.Lock()

    # --- sessions -------------------------------------------------------------
    def bind(self, session_hash: str, sid: str, identity: Identity | None = None) -> None:
        """Bind a chat to the browser that first used it; refuse it to any other.

        A chat id nobody has used yet is bound only within the new-chats window of the
        caller's address (``identity``; RLHF_SESSION_RATE_IP): each binding is a key kept
        for a week and a chat held in memory, and a client picks its chat ids freely."""
        with self._lock:
            owner = self._bindings.get(session_hash)
        if owner is None:
            key = BIND_PREFIX + session_hash
            try:
                stored = self.client.get(key)
                if stored is None:
                    if identity is not None:
                        self.check_rate("session", identity)
                    stored = self.client.set(key, sid, nx=True, ex=BIND_TTL_S, get=True)
                owner = sid if stored is None else stored.decode()
                if owner == sid:
                    self.client.expire(key, BIND_TTL_S)
            except redis.RedisError as error:
                # Chatting works while the store is down (answers wait to be saved);
                # this process remembers the binding and enforces it meanwhile.
                log.warning("session binding not stored (%s); kept in this process", error)
                owner = sid
            with self._lock:
                self._bindings[session_hash] = owner
                self._bindings.move_to_end(session_hash)
                while len(self._bindings) > _LOCAL_BINDINGS_MAX:
                    self._bindings.popitem(last=False)
        if owner != sid:
            raise AccessError(FOREIGN_SESSION)

    def owner(self, session_hash: str) -> str | None:
        """The cookie id a chat is bound to; None when it is not bound yet (or the store
        cannot say: chatting survives an outage, see :meth:`bind`)."""
        with self._lock:
            owner = self._bindings.get(session_hash)
        if owner is not None:
            return owner
        try:
            stored = self.client.get(BIND_PREFIX + session_hash)
        except redis.RedisError:
            return None
        return None if stored is None else stored.decode()

    def identify(self, request: Any) -> Identity:
        """Who sent this request, or AccessError (no or forged cookie, someone else's
        chat, too many new chats from one address). Every handler calls this before it
        touches a session."""
        if request is None:
            raise AccessError(NO_SESSION)
        try:
            session_hash = validation.session_id(getattr(request, "session_hash", None))
        except validation.InputError as error:
            raise AccessError(str(error)) from error
        cookies = getattr(request, "cookies", None) or {}
        raw = cookies.get(COOKIE)
        if raw is None:
            raise AccessError(NO_COOKIE)
        sid = verify(self.secret, raw)
        if sid is None:
            raise AccessError(BAD_COOKIE)
        account = account_of(request, self.settings)
        peer = _peer(request)
        local = is_loopback(peer) and not _forwarded(request)
        identity = Identity(
            user_id=account or f"{ANON}{sid[:16]}",
            account=account,
            session_id=session_hash,
            ip=client_ip(request, self.settings),
            admin=is_admin(account, self.settings, local=local),
            local=local,
            browser_user=f"{ANON}{sid[:16]}",
        )
        self.bind(session_hash, sid, identity)
        return identity

    def require_chat(self, identity: Identity) -> None:
        if not may_chat(identity, self.settings):
            raise AccessError(SIGN_IN_TO_CHAT)

    def require_admin(self, identity: Identity) -> None:
        if not identity.admin:
            raise AccessError(NOT_ADMIN)

    def may_train(self, identity: Identity) -> bool:
        return may_train(identity, self.settings)

    # --- rate limits ----------------------------------------------------------
    def take_answer_slot(self, identity: Identity) -> AnswerSlot:
        """One more answer being written for this caller (its account and its address
        block), or TooManyAnswers when either already has ``answers_in_flight``; the caller
        releases the slot when the answer ends (:class:`AnswerSlot`).

        A chat answers one message at a time, but new chats are cheap: without this, one
        address could hold every decode slot of the process with a few dozen chats and leave
        everyone else waiting in the queue. Counted in this process, as the slots are its own;
        admins are not counted; a slot whose answer nobody reads any more (ABANDONED_AFTER_S)
        no longer counts."""
        limit = self.settings.answers_in_flight
        if identity.admin or limit <= 0:
            return AnswerSlot()
        keys = (f"account:{identity.user_id}", f"ip:{address_block(identity.ip)}")
        now = time.monotonic()
        with self._lock:
            for key in keys:
                held = self._answering.get(key, set())
                held -= {slot for slot in held if slot.abandoned(now)}
                if len(held) >= limit:
                    who = "this address" if key.startswith("ip:") else "your account"
                    raise TooManyAnswers(
                        f"{limit} answers are already being written for {who}, the most this "
                        "service writes for one person at once. Wait for one to finish, then "
                        "send again."
                    )
            slot = AnswerSlot(lambda slot: self._free(keys, slot))
            for key in keys:
                self._answering.setdefault(key, set()).add(slot)
        return slot

    def _free(self, keys: tuple[str, ...], slot: AnswerSlot) -> None:
        with self._lock:
            for key in keys:
                held = self._answering.get(key)
                if held is not None:
                    held.discard(slot)
                    if not held:
                        del self._answering[key]

    def check_rate(self, kind: str, identity: Identity, cost: int = 1) -> None:
        """Count a ``kind`` ('message' or 'feedback') request, as ``cost`` of them (an arena
        message asks for two answers), against the caller's account and IP windows;
        RateLimited when a window is full. Admins are not counted. Fails open when Redis
        is down: chatting must survive an outage."""
        if identity.admin:
            return
        checks = [
            (item, scope, key)
            for scope, key in (("account", identity.user_id), ("ip", address_block(identity.ip)))
            for item in self.limits.get((kind, scope), [])
        ]
        for item, scope, _key in checks:
            if cost > item.amount:
                # No wait would ever let it through: say so instead of "try again in N s".
                raise RateLimited(
                    f"This asks for {cost} answers at once (an arena message: one from each "
                    f"version), and this service takes at most {item.amount} per "
                    f"{_window(item)} from one {_scope_word(scope)}. Chat in the Chat tab, "
                    "one answer at a time."
                )
        try:
            for item, scope, key in checks:
                if not self.limiter.test(item, kind, scope, key, cost=cost):
                    raise self._limited(kind, scope, item, key)
            for item, scope, key in checks:
                if not self.limiter.hit(item, kind, scope, key, cost=cost):
                    raise self._limited(kind, scope, item, key)
        except redis.RedisError as error:
            log.warning("rate limit not checked, Redis unavailable: %s", error)

    def _limited(self, kind: str, scope: str, item: Any, key: str) -> RateLimited:
        try:
            reset = self.limiter.get_window_stats(item, kind, scope, key).reset_time
            wait = max(1, int(reset - time.time() + 0.999))
        except redis.RedisError:
            wait = item.get_expiry()
        what = {"message": "messages", "feedback": "reactions", "login": "sign-in attempts"}
        what = what.get(kind, "new chats")
        return RateLimited(
            f"Too many {what}: this service takes at most {item.amount} per {_window(item)} "
            f"from one {_scope_word(scope)}. Try again in {_wait_words(wait)}.",
            retry_after_s=wait,
        )


def _wait_words(seconds: int) -> str:
    """A wait as a person reads it: "42 s", "5 minutes", "23 hours" (rounded up)."""
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 2 * 3600:
        return f"{-(-seconds // 60)} minutes"
    return f"{-(-seconds // 3600)} hours"


def _window(item: Any) -> str:
    """A rate limit's window in words: "hour", "10 minute"."""
    name = item.GRANULARITY.name
    return f"{item.multiples} {name}" if item.multiples > 1 else name


def _scope_word(scope: str) -> str:
    return "account" if scope == "account" else "address"


# ------------------------------------------------------------------ ASGI middlewares


def _json_response(status: int, detail: str, extra_headers: list | None = None):
    body = json.dumps({"detail": detail, "error": detail}).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        *(extra_headers or []),
    ]
    return status, headers, body


async def _send_response(send: Any, status: int, headers: list, body: bytes) -> None:
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


_CALL_RE = re.compile(r"^/gradio_api/(call/v2|call|run|api)/([^/]+)/?$")
# Gradio's routes that take a file (an upload; a recording to convert; an upload's progress,
# which keeps an entry for every id anyone asks about, for good): nothing here takes one.
FILE_PATHS = frozenset(
    {"/gradio_api/upload", "/gradio_api/process_recording", "/gradio_api/upload_progress"}
)
# Gradio's route for components with server functions (a file explorer, an image editor):
# none on this page. It built a session's state for any id it was given (see below).
COMPONENT_SERVER_PATH = "/gradio_api/component_server"
# Gradio's route that saves a session's component values (the chat it shows included) to
# disk for a shareable link, for whoever names the session: no link button on this page.
DEEP_LINK_PATH = "/gradio_api/deep_link"
# Gradio's routes that name a chat by its session hash and run no handler of ours.
CANCEL_PATH = "/gradio_api/cancel"
HEARTBEAT_PREFIX = "/gradio_api/heartbeat/"
# Sessions whose state Gradio keeps (``launch(state_session_capacity=...)``, least recently
# used dropped). Gradio builds one, a copy of every component's config (~160 KB here), for
# every session id it has not seen, before any handler of ours can refuse the request: at
# Gradio's 10,000, fresh ids from one address grew the UI by 1.6 GB. Gradio also keeps each
# session's last component values there, but this app reads none back (the chat lives in
# ChatService, no gr.State; deep links are refused), so a dropped one costs nothing.
GRADIO_SESSION_STATES = 500
_JOIN_RE = re.compile(r"^/gradio_api/(?:queue/join|call/v2/[^/]+|call/[^/]+|run/[^/]+)/?$")


def prune_unread_records(queue: Any) -> int:
    """Drop Gradio's records of finished events whose results nobody can read any more.

    Gradio's queue keeps, per session hash, the ids of its events until a client reads their
    results. A hand-made ``POST /gradio_api/call/NAME`` that never reads them (any session
    hash, any number of times, even one its handler refuses) leaves one record each for good,
    and every ``GET /gradio_api/call/NAME/<id>`` scans them all on the event loop: memory
    and every visitor's result fetches grew with them. The results themselves sit in an
    LRU of 2000 sessions; a record whose session has left it, and whose events are neither
    queued nor running, can never be read. Call it on the event loop (Gradio's own code
    changes these dicts there without a lock). Returns how many session records went."""
    records = queue.pending_event_ids_session
    results = queue.pending_messages_per_session
    gone = [
        session for session in records
        if session not in results and not _has_live_events(queue, session)
    ]  # fmt: skip
    for session in gone:
        del records[session]
    return len(gone)


PRUNE_EVERY_JOINS = 64


class LiveSessionsKept(OrderedDict):
    """Gradio's per-session message queues (``Queue.pending_messages_per_session``), where
    a full store drops the oldest session with no event queued or running, not the oldest
    session.

    Gradio keeps them in an LRU of 2000 sessions that drops the oldest first, and every
    join with a session hash it has not seen adds one, before any handler runs: 2000
    refused joins with fresh hashes, cheap and from one address, pushed every chat that was
    streaming out of it, and each lost its answer (its stream read 404, the handler's next
    message a KeyError). A session with an event queued or running is kept; those are
    bounded by the queue's size and the concurrency limits, far below the store's. Gradio's
    code reads and writes it only on the event loop, so no lock."""

    def __init__(self, queue: Any, max_size: int) -> None:
        super().__init__()
        self.queue = queue
        self.max_size = max_size

    def __setitem__(self, key: Any, value: Any) -> None:
        if key in self:
            self.move_to_end(key)
        elif len(self) >= self.max_size:
            del self[self._oldest_idle()]
        super().__setitem__(key, value)

    def _oldest_idle(self) -> Any:
        return next((s for s in self if not _has_live_events(self.queue, s)), next(iter(self)))


def _has_live_events(queue: Any, session: str) -> bool:
    """Whether Gradio's ``queue`` has an event of ``session`` queued or running."""
    live = queue.event_ids_to_events
    return any(event_id in live for event_id in queue.pending_event_ids_session.get(session, ()))


def keep_live_sessions(queue: Any) -> None:
    """Make ``queue`` (Gradio's) drop idle sessions before live ones (:class:`LiveSessionsKept`)."""
    entries = queue.pending_messages_per_session
    kept = LiveSessionsKept(queue, getattr(entries, "max_size", 2000))
    for session, messages in entries.items():
        kept[session] = messages
    queue.pending_messages_per_session = kept


class BoundaryMiddleware:
    """Session cookie, body size limit, name allowlist and the busy message, in one
    pass (one ASGI layer: every request pays for it, so it stays cheap)."""

    def __init__(
        self,
        app: Any,
        *,
        secret: bytes,
        max_body: int,
        secure_cookie: bool,
        gradio_queue: Callable[[], Any] | None = None,
        settings: Settings | None = None,
        access: Access | None = None,
    ) -> None:
        self.app = app
        self.secret = secret
        self.max_body = max_body
        # Where visitors' addresses come from (RLHF_CLIENT_IP_HEADER): the per-address cap
        # on waiting requests (WAITING_PER_ADDRESS); None: no cap.
        self.settings = settings
        # Counts password tries (LOGIN_RATE_IP) in its Redis windows; None: not counted.
        self.access = access
        self.joining: dict[str, int] = {}  # address block -> joins not yet queued
        # Gradio's queue (built after the middleware): its unread records are pruned every
        # PRUNE_EVERY_JOINS queue joins (prune_unread_records).
        self.gradio_queue = gradio_queue
        self.joins = 0
        attrs = f"Path=/; HttpOnly; Max-Age={COOKIE_MAX_AGE_S}"
        # A Space shows the app in an iframe on another site: the cookie must be
        # SameSite=None; Secure there to come back at all.
        attrs += "; SameSite=None; Secure" if secure_cookie else "; SameSite=Lax"
        self.cookie_attrs = attrs

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        method = scope.get("method", "GET")
        root = scope.get("root_path", "") or ""
        if root and path.startswith(root):
            path = path[len(root) :]

        if path.rstrip("/") in FILE_PATHS:
            # No component here takes a file: uploads would only make the Space a free
            # file host, each kept on disk (Gradio keeps what is uploaded until restart).
            await _send_response(
                send, *_json_response(404, "This service takes no files: send text instead.")
            )
            return
        if path.rstrip("/") == COMPONENT_SERVER_PATH:
            await _send_response(
                send, *_json_response(404, "No component on this page has server functions.")
            )
            return
        if path.rstrip("/") == DEEP_LINK_PATH:
            await _send_response(send, *_json_response(404, "This page makes no shareable links."))
            return
        if method == "POST" and path.rstrip("/") in LOGIN_PATHS and self.access is not None:
            refused = await self._login_refused(scope)
            if refused is not None:
                wait = str(refused.retry_after_s or 60).encode()
                await _send_response(
                    send, *_json_response(429, str(refused), [(b"retry-after", wait)])
                )
                return
        if method == "POST":
            match = _CALL_RE.match(path)
            # The page itself posts non-queued events to /run/predict with an fn_index
            # (not a name): that route stays open, and each handler checks its caller.
            page_route = match is not None and match.groups() in (("run", "predict"),)
            if (
                match
                and not page_route
                and match.group(2) not in PUBLIC_ENDPOINTS | ADMIN_ENDPOINTS
            ):
                names = ", ".join(f"/{n}" for n in sorted(PUBLIC_ENDPOINTS))
                await _send_response(
                    send,
                    *_json_response(
                        404, f"No public endpoint /{match.group(2)}. The public ones: {names}."
                    ),
                )
                return

        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None:
            try:
                too_big = int(length) > self.max_body
            except ValueError:
                too_big = True
            if too_big:
                await _send_response(send, *self._too_big())
                return
        buffered: bytes | None = None
        if method in ("POST", "PUT", "PATCH") and (
            length is None or path.rstrip("/") == CANCEL_PATH
        ):
            # No length given (chunked), or a cancel whose chat is checked below: read up to
            # the limit before the app sees it.
            chunks, size = [], 0
            while True:
                message = await receive()
                if message["type"] != "http.request":
                    break
                chunks.append(message.get("body", b""))
                size += len(chunks[-1])
                if size > self.max_body:
                    await _send_response(send, *self._too_big())
                    return
                if not message.get("more_body"):
                    break
            body = buffered = b"".join(chunks)
            replayed = False
            # Kept apart: ``receive`` is rebound to receive_again below, and a second call
            # (a response that listens for the client leaving) would then call itself.
            receive_after_body = receive

            async def receive_again() -> dict:
                nonlocal replayed
                if not replayed:
                    replayed = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await receive_after_body()

            receive = receive_again

        sid = verify(self.secret, _cookie(headers.get(b"cookie", b"")))
        cookie_ok = sid is not None
        chat = _chat_named(method, path, scope, buffered) if self.access is not None else None
        if chat is not None and await self._foreign(chat, sid):
            await _send_response(send, *_json_response(404, FOREIGN_SESSION))
            return
        busy_check = method == "POST" and _JOIN_RE.match(path) is not None
        if busy_check and self.gradio_queue is not None:
            self.joins += 1
            queue = self.gradio_queue()
            if queue is not None and self.joins % PRUNE_EVERY_JOINS == 0:
                prune_unread_records(queue)
            joining = self._address_if_capped(scope) if queue is not None else None
            if joining is not None and self._waiting(queue, joining) >= WAITING_PER_ADDRESS:
                await _send_response(
                    send, *_json_response(429, WAITING_TOO_MANY, [(b"retry-after", b"10")])
                )
                return
        else:
            joining = None
        held: dict | None = None

        async def send_wrapped(message: dict) -> None:
            nonlocal held
            if message["type"] == "http.response.start":
                if not cookie_ok:
                    cookie = f"{COOKIE}={new_cookie_value(self.secret)}; {self.cookie_attrs}"
                    message = dict(message)
                    message["headers"] = [
                        *message.get("headers", []),
                        (b"set-cookie", cookie.encode()),
                    ]
                if busy_check and message["status"] == 503:
                    held = message  # replace Gradio's "Queue is full. Max size is ..." text
                    return
            elif held is not None and message["type"] == "http.response.body":
                if message.get("more_body"):
                    return
                status, headers_, body = _json_response(503, BUSY, [(b"retry-after", b"30")])
                keep = [(k, v) for k, v in held.get("headers", []) if k.lower() == b"set-cookie"]
                await send(
                    {"type": "http.response.start", "status": status, "headers": [*headers_, *keep]}
                )
                await send({"type": "http.response.body", "body": body})
                return
            await send(message)

        if joining is None:
            await self.app(scope, receive, send_wrapped)
            return
        # Counted from here until Gradio has queued it (or refused it): a burst of joins
        # sent at once would otherwise all pass before the first reached the queue.
        self.joining[joining] = self.joining.get(joining, 0) + 1
        try:
            await self.app(scope, receive, send_wrapped)
        finally:
            self.joining[joining] -= 1
            if not self.joining[joining]:
                del self.joining[joining]

    async def _login_refused(self, scope: dict) -> RateLimited | None:
        """Why this password try is refused (over LOGIN_RATE_IP for its address), else
        None. Counted in a worker thread: the limiter's Redis calls would block the loop."""
        import anyio

        access = self.access
        ip = client_ip(Request(scope), access.settings)
        caller = Identity(user_id="", account=None, session_id="", ip=ip)
        try:
            await anyio.to_thread.run_sync(access.check_rate, "login", caller)
        except RateLimited as error:
            return error
        return None

    async def _foreign(self, chat: str, sid: str | None) -> bool:
        """Whether ``chat`` is bound to another browser than the cookie id ``sid``."""
        import anyio

        owner = await anyio.to_thread.run_sync(self.access.owner, chat)
        return owner is not None and owner != sid

    def _address_if_capped(self, scope: dict) -> str | None:
        """The address block whose waiting requests ``WAITING_PER_ADDRESS`` caps, for this
        request; None for a visitor on this machine (the laptop's own user, a benchmark's
        simulated ones) or without settings."""
        settings = self.settings
        if settings is None:
            return None
        ip = client_ip(Request(scope), settings)
        return None if is_loopback(ip) else address_block(ip)

    def _waiting(self, queue: Any, block: str) -> int:
        """Requests of ``block`` waiting in Gradio's queue (queued, not started: at most
        RLHF_MAX_QUEUE to look through) or on their way into it. Everything here runs on
        the event loop, as Gradio's own changes to the queue do: no lock."""
        settings = self.settings
        waiting = self.joining.get(block, 0)
        for group in list(queue.event_queue_per_concurrency_id.values()):
            for event in list(group.queue):
                if address_block(client_ip(event.request, settings)) == block:
                    waiting += 1
        return waiting

    def _too_big(self):
        return _json_response(
            413,
            f"The request is larger than this service accepts ({self.max_body // 1024} KiB, "
            "RLHF_MAX_BODY_KB). Send less text at once.",
        )


def _chat_named(method: str, path: str, scope: dict, body: bytes | None) -> str | None:
    """The chat (session hash) a request to one of Gradio's session routes names: reading
    its results, its heartbeat (whose end closes the chat's events), cancelling its events.
    These take a session hash and no handler of ours runs, so the binding is checked here."""
    path = path.rstrip("/")
    if method == "GET" and path == "/gradio_api/queue/data":
        from urllib.parse import parse_qs

        values = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("session_hash")
        return values[-1] if values else None
    if method == "GET" and path.startswith(HEARTBEAT_PREFIX):
        return path[len(HEARTBEAT_PREFIX) :] or None
    if method == "POST" and path == CANCEL_PATH and body:
        try:
            chat = json.loads(body).get("session_hash")
        except (ValueError, AttributeError):
            return None
        return chat if isinstance(chat, str) else None
    return None


def _cookie(raw: bytes) -> str | None:
    for part in raw.decode("latin-1").split(";"):
        name, _, value = part.strip().partition("=")
        if name == COOKIE:
            return value
    return None
