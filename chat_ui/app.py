"""The chat page: layout first, listeners at the bottom, handlers in handlers.py.

Every endpoint a person uses is also an API endpoint with a name, so
``gradio_client`` (and the tests) drive exactly what the buttons drive:

- ``/send(message, system_prompt, temperature, top_p, max_new_tokens)`` streams the answer
- ``/vote(index, kind)`` kind is like / dislike / unvote; index of the answer in the
  chat (negative counts from the end)
- ``/rewrite(index, text)``, ``/regenerate(index, temperature, top_p, max_new_tokens)``
- ``/undo()``, ``/new_chat()``, ``/status()``
- ``/set_no_train(on)`` the chat's "don't use this chat for training" switch
- ``/delete_my_data()`` deletes every turn and reaction of this session's user

Each returns the chat (a list of {role, content} messages), the answers' metadata
(turn id, policy version, vote) as JSON, and the policy badge. The session is the
Gradio session (``request.session_hash``): one per browser tab or client, bound to
the browser's server-issued cookie; who the caller is, whether they may do it and
how often is decided by chat_ui/access.py before a handler touches anything.
Every other handler is refused by name (see access.PUBLIC_ENDPOINTS) and checks its
caller as well.
"""

from __future__ import annotations

import functools
import inspect
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr
import redis

from chat_ui import access as access_mod
from chat_ui import training, validation
from chat_ui.access import Access, AccessError, AnswerSlot, Identity, RateLimited
from chat_ui.handlers import (
    EMPTY_ANSWER,
    STORE_ERRORS,
    Admit,
    ArenaUpdate,
    ChatService,
    InputError,
    Update,
)
from rlhf_core.feedback import FeedbackStore
from rlhf_core.modeling import load_base_model
from rlhf_core.redis_server import (
    RedisUnavailableError,
    connect,
    discover_url,
    durability_warnings,
    redact,
)
from rlhf_core.serving import PolicyServer
from rlhf_core.settings import Settings

log = logging.getLogger(__name__)

STORE_DOWN = (
    "Feedback store unreachable, retrying… Nothing was lost on this page; "
    "try again in a few seconds."
)


@dataclass
class ChatApp:
    """Everything one UI process runs."""

    settings: Settings
    service: ChatService
    demo: gr.Blocks
    access: Access
    watcher: training.VersionWatcher | None = None
    url: str | None = None

    def close(self) -> None:
        if self.watcher is not None:
            self.watcher.stop()
        self.demo.close()
        answers, reactions = self.service.save_pending()
        if answers or reactions:
            log.error(
                "Stopping with %d answers and %d reactions unsaved (the feedback store is "
                "unreachable): they are lost with this process.",
                answers,
                reactions,
            )
        self.service.policy.close()


# --- rendering -------------------------------------------------------------------
def footer(message: dict[str, Any]) -> str:
    if message.get("turn_id") is None:
        return f"\n\n<sub>writing… v{message['version']}</sub>"
    edited = " · edited by you" if message.get("rewritten") else ""
    return f"\n\n<sub>written by v{message['version']}{edited}</sub>"


def chat_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The session's messages as the Chatbot shows them (assistant answers get a footer
    saying which policy version wrote them). Each text goes as a text part, not a plain
    string: Gradio passes a plain string through ``inspect.cleandoc``, which expands tabs
    and strips the indentation its lines after the first share (a code answer lost its
    indentation), so the page showed other text than the store holds and a rewrite
    started from."""
    out = []
    for m in messages:
        text = (
            (m["content"] or EMPTY_ANSWER) + footer(m) if m["role"] == "assistant" else m["content"]
        )
        out.append({"role": m["role"], "content": {"type": "text", "text": text}})
    return out


def meta(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        {"index": i, **{k: m.get(k) for k in ("turn_id", "version", "vote", "rewritten", "saved")}}
        for i, m in enumerate(messages)
        if m["role"] == "assistant"
    ]


def badge(version: int, store_ok: bool = True) -> str:
    text = f"**current policy version {version}**"
    if not store_ok:
        text += " · ⚠️ feedback store unreachable, retrying…"
    return text


def render(update: Update) -> tuple[list[dict[str, str]], list[dict[str, Any]], str]:
    return chat_messages(update.messages), meta(update.messages), badge(update.version)


def feedback_values(messages: list[dict[str, Any]]) -> list[str | None]:
    """The 👍/👎 state the Chatbot shows per answer, from the session (so an undone vote
    or a new chat resets the icons)."""
    return feedback_labels([m.get("vote") for m in messages if m["role"] == "assistant"])


def feedback_labels(votes: list[str | None]) -> list[str | None]:
    return [{"like": "Like", "dislike": "Dislike"}.get(v or "") for v in votes]


def _notify(update: Update, shown: set[str]) -> None:
    for notice in update.notices:
        if notice not in shown:
            shown.add(notice)
            gr.Warning(notice)


INPUT_TITLE = "Cannot do that"
STORE_TITLE = "Feedback store unreachable"
SERVER_TITLE = "Something went wrong"


def _fail(error: Exception) -> gr.Error:
    """Every exception that reaches the page, as a message a person can act on."""
    if isinstance(error, gr.Error):
        return error
    if isinstance(error, InputError):
        return gr.Error(str(error), title=INPUT_TITLE)
    if isinstance(error, RateLimited):
        return gr.Error(str(error), title="Slow down")
    if isinstance(error, AccessError):
        return gr.Error(str(error), title="Not allowed")
    if isinstance(error, STORE_ERRORS):
        # Visitors never see addresses or exception text: the log has them.
        log.warning("feedback store unreachable: %s", error)
        return gr.Error(STORE_DOWN, title=STORE_TITLE)
    # A bug of ours: the person gets what to do, the log gets the traceback.
    log.exception("unexpected error in a UI handler")
    return gr.Error(
        f"The server could not do that ({type(error).__name__}); your chat is as it was. "
        "Try again; if it keeps failing, start a new chat or reload the page.",
        title=SERVER_TITLE,
    )


def guarded(fn):
    """The UI boundary: no exception leaves a handler as anything but a clear gr.Error.
    A streaming handler that fails first puts the page back to what the session holds
    (``restore(request)``), so a failed answer does not stay on screen half-written."""
    if inspect.isgeneratorfunction(fn):

        @functools.wraps(fn)
        def stream(*args: Any, **kwargs: Any):
            try:
                yield from fn(*args, **kwargs)
            except Exception as error:
                raise _fail(error) from error

        return stream

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any):
        try:
            return fn(*args, **kwargs)
        except Exception as error:
            raise _fail(error) from error

    return call


def public_model_name(base_model: str) -> str:
    """What a visitor is told of RLHF_BASE_MODEL: a hub id as it is, a local folder by its
    last part only (its full path says how the operator's disks are laid out)."""
    path = Path(base_model).expanduser()
    if path.is_absolute() or base_model.startswith(".") or path.exists():
        return path.name or "a local model"
    return base_model


PICKS = {"a": "A is better", "b": "B is better", "tie": "a tie", "both_bad": "both are bad"}


def arena_view(update: ArenaUpdate) -> tuple[str, str, str]:
    """The two answers, and after the pick, which version wrote which."""
    a = update.a or ("*(writing…)*" if not update.done else EMPTY_ANSWER)
    b = update.b or ("*(waiting for A…)*" if not update.done else EMPTY_ANSWER)
    if update.picked is None:
        result = "Pick the better answer." if update.done else "Both versions are answering…"
    else:
        va, vb = update.versions or (None, None)
        result = (
            f"You picked **{PICKS[update.picked]}**. Answer A was written by **v{va}**, "
            f"answer B by **v{vb}**. Thank you: the pick trains the reward model and counts "
            "in the live comparison of the two versions."
        )
    return a, b, result


def consent_notice(settings: Settings) -> str:
    """What the first-visit notice says: what is stored, that it trains the model, and
    how to keep a chat out or delete everything."""
    kept = (
        f"Chats are deleted after {settings.retention_days:g} days."
        if settings.retention_days is not None
        else "Chats are kept until you delete them."
    )
    return (
        "**Before you start: this chat learns from you.** We store your messages, the "
        "model's answers, your 👍 / 👎, your edits and regenerates, the settings you used, "
        "the time, and an id for you (your account when signed in, otherwise a random id "
        "for this browser tab). **They are used to train the model that everyone here "
        "talks to**, and may be exported as a training dataset, with e-mail addresses, "
        "phone numbers, card numbers and keys removed first. Do not type anything you "
        f"would not want to share. {kept}\n\n"
        "Switch on **Don't use this chat for training** to keep a chat out (its earlier "
        "answers too). **Delete my data** removes everything you wrote from the store and "
        "from all later training and exports."
    )


# --- the page ----------------------------------------------------------------------
def build_app(settings: Settings, service: ChatService, access: Access) -> gr.Blocks:
    store = service.store

    def who(request: gr.Request, kind: str | None = None) -> Identity:
        """The caller, checked: their own chat, allowed to chat, within their rate
        limits for ``kind`` ('feedback'; messages are counted by :func:`charge`, once
        they will be answered). Raises gr.Error otherwise."""
        try:
            identity = access.identify(request)
            access.require_chat(identity)
            if kind is not None:
                access.check_rate(kind, identity)
        except AccessError as error:
            raise _fail(error) from error
        service.session(identity.session_id, identity.user_id, access.may_train(identity))
        return identity

    def charge(identity: Identity, cost: int = 1) -> Admit:
        """The service's ``admit`` (handlers.Admit): takes one of the caller's answers in
        flight (RLHF_ANSWERS_IN_FLIGHT) and counts ``cost`` messages against their rate
        limits once the request will be answered; gr.Error when over. Returns the slot,
        which the service marks paused at each streamed update and releases when it ends."""

        def admit() -> AnswerSlot:
            try:
                slot = access.take_answer_slot(identity)
            except AccessError as error:
                raise _fail(error) from error
            try:
                access.check_rate("message", identity, cost)
            except BaseException as error:
                slot.release()  # refused, or failed: either way it holds nothing
                if isinstance(error, AccessError):
                    raise _fail(error) from error
                raise
            return slot

        return admit

    with gr.Blocks(title="rlhf-chat") as demo:
        # Remembered in the browser, so the notice shows once per browser, not per visit.
        consent_seen = gr.BrowserState(False, storage_key="rlhf-chat-consent-seen")
        with gr.Group(visible=True, elem_id="consent-notice") as consent_box:
            gr.Markdown(consent_notice(settings))
            consent_ok = gr.Button("I understand", variant="primary", elem_id="consent-ok")
        if access_mod.auth_mode(settings) == "hf":
            gr.LoginButton()
        with gr.Tab("Chat"):
            with gr.Row():
                with gr.Column(scale=3):
                    policy_badge = gr.Markdown(
                        badge(service.policy.current_version), elem_id="policy-badge"
                    )
                    chatbot = gr.Chatbot(
                        label="Chat",
                        elem_id="chatbot",
                        height=520,
                        editable="all",
                        feedback_options=("Like", "Dislike"),
                        placeholder="Ask anything. React with 👍 / 👎, edit an answer into the "
                        "one you wanted, or regenerate it: the model learns from it.",
                    )
                    with gr.Row():
                        textbox = gr.Textbox(
                            show_label=False,
                            placeholder="Type a message and press Enter",
                            elem_id="message",
                            scale=6,
                            autofocus=True,
                        )
                        send_button = gr.Button("Send", variant="primary", elem_id="send", scale=1)
                    with gr.Row():
                        regenerate_button = gr.Button("↻ Regenerate", elem_id="regenerate")
                        undo_button = gr.Button("↶ Undo", elem_id="undo")
                        new_chat_button = gr.Button("New chat", elem_id="new-chat")
                with gr.Column(scale=1, min_width=240):
                    gr.Markdown("### Settings")
                    system_prompt = gr.Textbox(
                        settings.system_prompt,
                        label="System prompt",
                        lines=3,
                        elem_id="system-prompt",
                    )
                    temperature = validation.unchecked(
                        gr.Slider(
                            *validation.TEMPERATURE_RANGE,
                            settings.temperature,
                            step=0.05,
                            label="Temperature",
                        )
                    )
                    top_p = validation.unchecked(
                        gr.Slider(*validation.TOP_P_RANGE, settings.top_p, step=0.05, label="Top-p")
                    )
                    max_new_tokens = validation.unchecked(gr.Slider(
                        *validation.MAX_NEW_TOKENS_RANGE, settings.max_new_tokens, step=1,
                        label="Max new tokens",
                    ))  # fmt: skip
                    gr.Markdown("### Your data")
                    no_train = gr.Checkbox(
                        False,
                        label="Don't use this chat for training",
                        info="Covers this whole chat, answers already given included.",
                        elem_id="no-train",
                    )
                    forget_button = gr.Button(
                        "Delete my data…", variant="stop", size="sm", elem_id="delete-my-data"
                    )
                    with gr.Group(visible=False) as forget_confirm:
                        gr.Markdown(
                            "Delete every message, answer and reaction of yours from the "
                            "store, and from all later training and exports? This cannot "
                            "be undone. (Versions already trained keep what they learnt.)"
                        )
                        with gr.Row():
                            forget_yes = gr.Button(
                                "Yes, delete", variant="stop", elem_id="delete-my-data-yes"
                            )
                            forget_no = gr.Button("Cancel", elem_id="delete-my-data-no")
            # Inputs of the API-only endpoints (/vote, /rewrite, /regenerate by index).
            with gr.Row(visible=False):
                api_index = validation.unchecked(gr.Number(-1, precision=0, label="answer index"))
                api_kind = gr.Textbox("like", label="vote: like, dislike or unvote")
                api_text = gr.Textbox("", label="rewritten answer")
                vote_button = gr.Button("vote")
                rewrite_button = gr.Button("rewrite")
                status_button = gr.Button("status")
                answers = gr.JSON(label="answers")
                status_json = gr.JSON(label="status")
        with gr.Tab("Arena"):
            gr.Markdown(
                "Two versions of the model answer the same message; you do not see which is "
                "which. Pick the better answer (or a tie, or both bad): it teaches the reward "
                "model and counts in the comparison of versions."
            )
            with gr.Row():
                arena_box = gr.Textbox(
                    show_label=False, placeholder="A message for both versions",
                    elem_id="arena-message", scale=6,
                )  # fmt: skip
                arena_send = gr.Button("Send to both", variant="primary", elem_id="arena-send")
            with gr.Row():
                with gr.Column():
                    gr.Markdown("#### Answer A")
                    arena_a = gr.Markdown("", elem_id="arena-a")
                with gr.Column():
                    gr.Markdown("#### Answer B")
                    arena_b = gr.Markdown("", elem_id="arena-b")
            with gr.Row():
                pick_buttons = {
                    "a": gr.Button("👈 A is better", elem_id="arena-pick-a"),
                    "b": gr.Button("👉 B is better", elem_id="arena-pick-b"),
                    "tie": gr.Button("🤝 Tie", elem_id="arena-pick-tie"),
                    "both_bad": gr.Button("👎 Both are bad", elem_id="arena-pick-both-bad"),
                }
            arena_result = gr.Markdown("", elem_id="arena-result")
            with gr.Row(visible=False):
                arena_outcome = gr.Textbox("a", label="pick: a, b, tie or both_bad")
                arena_pick_api = gr.Button("arena pick")
        with gr.Tab("Training") as training_tab:
            tab = training.build_training_tab(
                settings, client=store.redis, store=store, server=service.policy, access=access,
                swap_error=lambda: service.watcher.last_error if service.watcher else None,
            )  # fmt: skip
        timer = gr.Timer(max(2.0, settings.version_poll_s))

        # --- listeners ------------------------------------------------------------------
        outputs = [chatbot, answers, policy_badge]
        sampling_inputs = [temperature, top_p, max_new_tokens]

        def sampling_of(temp, p, max_new) -> dict[str, Any]:
            return validation.sampling(temp, p, max_new, settings)

        def restore(request: gr.Request):
            """The page as the session holds it (after a failed answer)."""
            try:
                session = service.session(request.session_hash)
                return render(Update(service.view(session), version=service.policy.current_version))
            except Exception:
                return (gr.skip(),) * 3

        @guarded
        def on_send(message, system, temp, p, max_new, request: gr.Request):
            shown: set[str] = set()
            identity = who(request)
            try:
                sampling = sampling_of(temp, p, max_new)
                for update in service.send(
                    identity.session_id, message, system, sampling, admit=charge(identity)
                ):
                    _notify(update, shown)
                    yield (*render(update), "")
            except Exception:
                # The message goes back into the box: nothing the person typed is lost.
                yield (*restore(request), message if isinstance(message, str) else gr.skip())
                raise

        @guarded
        def stream_regenerate(index, temp, p, max_new, request: gr.Request):
            shown: set[str] = set()
            identity = who(request)
            try:
                sampling = sampling_of(temp, p, max_new)
                for update in service.regenerate(
                    identity.session_id, index, sampling, admit=charge(identity)
                ):
                    _notify(update, shown)
                    yield render(update)
            except Exception:
                yield restore(request)
                raise

        @guarded
        def on_retry(data: gr.RetryData, temp, p, max_new, request: gr.Request):
            # The retry icon sits on the user message: its answer is the next message.
            index = validation.answer_index(data.index) + 1
            yield from stream_regenerate(index, temp, p, max_new, request)

        def call(method, *args):
            update = method(*args)
            _notify(update, set())
            return update

        def render_or_skip(update: Update):
            # done=False: the vote landed on the answer still streaming; the stream
            # keeps drawing the page, redrawing it here would flicker.
            return render(update) if update.done else (gr.skip(),) * 3

        @guarded
        def on_vote(index, kind, request: gr.Request):
            identity = who(request, "feedback")
            return render_or_skip(call(service.vote, identity.session_id, index, kind))

        @guarded
        def on_like(data: gr.LikeData, request: gr.Request):
            # Anything but true or false (a list, say, from a hand-made request) un-votes: a
            # dict lookup raised TypeError on an unhashable value.
            kind = "like" if data.liked is True else "dislike" if data.liked is False else "unvote"
            return on_vote(data.index, kind, request)

        @guarded
        def on_rewrite(index, text, request: gr.Request):
            identity = who(request, "feedback")
            return render(call(service.rewrite, identity.session_id, index, text))

        @guarded
        def on_edit(data: gr.EditData, request: gr.Request):
            session = service.session(who(request).session_id)
            index = validation.answer_index(data.index)
            if not (0 <= index < len(session.messages)) or (
                session.messages[index]["role"] != "assistant"
            ):
                gr.Warning(
                    "Only finished answers can be edited. To change your question, use Undo "
                    "and send it again."
                )
                return render(Update(service.view(session), version=service.policy.current_version))
            return on_rewrite(index, data.value, request)

        @guarded
        def on_undo(request: gr.Request):
            update = call(service.undo, who(request, "feedback").session_id)
            textbox = update.textbox if update.textbox is not None else gr.skip()
            # Undo of a new chat brings back that chat's training switch: show it.
            return (*render(update), textbox, update.no_train)

        @guarded
        def on_new_chat(request: gr.Request):
            return render(call(service.new_chat, who(request).session_id))

        @guarded
        def on_status(request: gr.Request):
            identity = who(request)
            status = service.status(identity.session_id)
            if not identity.admin:
                status["model"] = public_model_name(status["model"])
                if status.get("swap_error"):
                    # The watcher's error names hosts and paths: admins only (and the log).
                    status["swap_error"] = "the newest version could not be loaded yet"
            return status

        @guarded
        def on_tick(request: gr.Request):
            try:
                session_id = access.identify(request).session_id
            except AccessError:
                session_id = None  # the badge is public; someone else's session is not
            status = service.status(session_id)
            return badge(status["current_version"], status["store_ok"])

        @guarded
        def sync_feedback(request: gr.Request):
            return gr.Chatbot(feedback_value=feedback_labels(service.feedback_state(
                who(request).session_id
            )))  # fmt: skip

        @guarded
        def on_arena_send(message, system, temp, p, max_new, request: gr.Request):
            shown: set[str] = set()
            sampling = sampling_of(temp, p, max_new)
            identity = who(request)
            admit = charge(identity, cost=2)  # two versions answer
            for update in service.arena_send(
                identity.session_id, message, system, sampling, admit=admit
            ):
                _notify(Update([], notices=update.notices), shown)
                yield (*arena_view(update), "")

        @guarded
        def on_arena_pick(outcome, request: gr.Request):
            update = service.arena_pick(who(request, "feedback").session_id, outcome)
            _notify(Update([], notices=update.notices), set())
            return arena_view(update)

        @guarded
        def on_no_train(value, request: gr.Request):
            # A reaction's rate: each switch writes every turn of the chat and resets the
            # leaderboard's cache (the consent epoch).
            update = call(service.set_no_train, who(request, "feedback").session_id, value)
            return render(update)

        @guarded
        def on_forget(request: gr.Request):
            identity = who(request, "feedback")
            update = call(service.forget_me, identity.session_id, [identity.browser_user])
            return (*render(update), gr.update(visible=False))

        def on_consent_load(seen):
            return gr.update(visible=not seen)

        def on_unload(request: gr.Request):
            try:
                service.drop_session(access.identify(request).session_id)
            except AccessError:
                pass  # a stranger cannot close someone else's chat
            except Exception:  # the tab is gone: nobody to tell
                log.exception("dropping session failed")

        def on_page_load(request: gr.Request):
            # What this visitor sees of the Training tab: everything for an admin,
            # read-only (or nothing, RLHF_TRAINING_TAB=hidden) for everyone else.
            try:
                admin = access.identify(request).admin
            except AccessError:
                admin = False
            # gr.skip() where nothing changes: re-rendering the tabs while the person
            # already types would swallow their first message.
            hide_tab = training.tab_hidden_from(settings, admin)
            return (
                gr.update(visible=False) if hide_tab else gr.skip(),
                gr.update(visible=True) if admin else gr.skip(),
                gr.update(visible=True) if admin else gr.skip(),
            )

        # As many streams at once as the server decodes together (the batched server's
        # batch, or one for the sequential path); the queue shows the others their place.
        # After each change, the like/dislike icons follow the session's votes.
        sync = {
            "fn": sync_feedback,
            "outputs": chatbot,
            "api_visibility": "private",
            "queue": False,
        }
        generate = {
            "concurrency_id": "generate",
            "concurrency_limit": service.policy.max_concurrent_streams,
        }
        send_inputs = [textbox, system_prompt, *sampling_inputs]
        send_outputs = [*outputs, textbox]
        send_button.click(on_send, send_inputs, send_outputs, api_name="send", **generate).then(
            **sync
        )
        textbox.submit(
            on_send, send_inputs, send_outputs, api_visibility="private", **generate
        ).then(**sync)
        regenerate_button.click(
            stream_regenerate,
            [api_index, *sampling_inputs],
            outputs,
            api_name="regenerate",
            **generate,
        ).then(**sync)
        chatbot.retry(
            on_retry, sampling_inputs, outputs, api_visibility="private", **generate
        ).then(**sync)
        reactions = {"concurrency_limit": 8}
        vote_button.click(
            on_vote, [api_index, api_kind], outputs, api_name="vote", **reactions
        ).then(**sync)
        chatbot.like(on_like, None, outputs, api_visibility="private", **reactions).then(**sync)
        rewrite_button.click(
            on_rewrite, [api_index, api_text], outputs, api_name="rewrite", **reactions
        ).then(**sync)
        chatbot.edit(on_edit, None, outputs, api_visibility="private", **reactions).then(**sync)
        undo_button.click(
            on_undo, None, [*outputs, textbox, no_train], api_name="undo", **reactions
        ).then(**sync)
        new_chat_button.click(on_new_chat, None, outputs, api_name="new_chat", **reactions).then(
            **sync
        )
        chatbot.clear(on_new_chat, None, outputs, api_visibility="private", **reactions).then(
            **sync
        )
        status_button.click(on_status, None, status_json, api_name="status", queue=False)
        arena_outputs = [arena_a, arena_b, arena_result]
        arena_send_inputs = [arena_box, system_prompt, *sampling_inputs]
        arena_send.click(
            on_arena_send, arena_send_inputs, [*arena_outputs, arena_box], api_name="arena_send",
            **generate,
        )  # fmt: skip
        arena_box.submit(
            on_arena_send, arena_send_inputs, [*arena_outputs, arena_box],
            api_visibility="private", **generate,
        )  # fmt: skip
        arena_pick_api.click(
            on_arena_pick, arena_outcome, arena_outputs, api_name="arena_pick", **reactions
        )

        def picker(outcome: str):
            def pick(request: gr.Request):
                return on_arena_pick(outcome, request)

            return pick

        for outcome, button in pick_buttons.items():
            button.click(
                picker(outcome), None, arena_outputs, api_visibility="private", **reactions
            )
        no_train.input(on_no_train, no_train, outputs, api_name="set_no_train", **reactions)
        forget_button.click(
            lambda: gr.update(visible=True), None, forget_confirm, api_visibility="private",
            queue=False,
        )  # fmt: skip
        forget_no.click(
            lambda: gr.update(visible=False), None, forget_confirm, api_visibility="private",
            queue=False,
        )  # fmt: skip
        forget_yes.click(
            on_forget, None, [*outputs, forget_confirm], api_name="delete_my_data", **reactions
        ).then(**sync)
        consent_ok.click(
            lambda: (True, gr.update(visible=False)), None, [consent_seen, consent_box],
            api_visibility="private", queue=False,
        )  # fmt: skip
        demo.load(on_consent_load, consent_seen, consent_box, api_visibility="private", queue=False)
        timer.tick(
            on_tick,
            None,
            policy_badge,
            api_visibility="private",
            queue=False,
            show_progress="hidden",
        )
        demo.load(on_tick, None, policy_badge, api_visibility="private", queue=False)
        demo.load(
            on_page_load,
            None,
            [training_tab, tab["controls"], tab["ab_controls"]],
            api_visibility="private",
            queue=False,
        )
        demo.unload(on_unload)
    return demo


def create_app(settings: Settings, *, watch_versions: bool = True) -> ChatApp:
    """Load the model, connect to Redis, build the page (not yet served)."""
    access_mod.check_sign_in(settings)
    client = connect(settings)
    try:
        client.ping()
    except redis.RedisError as error:
        # The UI needs the store to start (its session key first); say so before the model
        # loads, not in redis-py's traceback: a replica started before its Redis, a typo.
        raise RedisUnavailableError(
            f"Redis at {redact(discover_url(settings) or '')} is unreachable "
            f"({type(error).__name__}: {error}). Start it, or check RLHF_REDIS_URL."
        ) from None
    try:
        for warning in durability_warnings(client):
            log.warning("Feedback may be lost: %s", warning)
    except redis.RedisError:
        pass  # the store failed just after its ping: the page says so, as a later check would
    store = FeedbackStore(client)
    # Before the model loads: a bad rate or sign-in setting is refused here (SettingsError),
    # not after a slow load.
    access = Access(settings, client, discover_url(settings))
    if settings.serving_backend == "vllm":
        from rlhf_core.vllm_backend import VLLMPolicyServer

        policy: PolicyServer = VLLMPolicyServer(settings)  # no model in this process
    else:
        policy = PolicyServer(load_base_model(settings), settings)
    watcher = None
    if watch_versions:
        watcher = training.VersionWatcher(policy, settings, client=client)
    service = ChatService(
        settings, policy, store, on_event=lambda: training.request_round_if_due(settings, store),
        route=watcher.version_for if watcher is not None else None,
        arena_versions=lambda: training.arena_pair(policy, watcher),
    )  # fmt: skip
    if watcher is not None:
        watcher.start()
        service.watcher = watcher
    demo = build_app(settings, service, access)
    return ChatApp(settings=settings, service=service, demo=demo, access=access, watcher=watcher)


def serve(settings: Settings, *, block: bool = True, watch_versions: bool = True) -> ChatApp:
    """Build and serve the page on settings.host:settings.port; with ``block=False``
    return once it listens (tests, and ``rlhf-chat up`` which supervises children)."""
    from starlette.middleware import Middleware

    app = create_app(settings, watch_versions=watch_versions)
    # max_size: beyond it a request is refused at once with access.BUSY, not queued for
    # minutes behind a crowd.
    # api_open=False: a queued handler (sending, voting...) answers only through the queue,
    # with its concurrency limits and RLHF_MAX_QUEUE. Gradio leaves POST /run/<name> open
    # off a Space, where a direct call skipped both (and held a server thread while it ran).
    app.demo.queue(default_concurrency_limit=8, max_size=settings.max_queue, api_open=False)
    access_mod.keep_live_sessions(app.demo._queue)
    boundary = Middleware(
        access_mod.BoundaryMiddleware,
        secret=app.access.secret,
        max_body=settings.max_body_kb * 1024,
        secure_cookie=access_mod.on_space(),
        gradio_queue=lambda: getattr(app.demo, "_queue", None),
        settings=settings,
        access=app.access,
    )
    app.demo.launch(
        server_name=settings.host,
        server_port=settings.port,
        prevent_thread_lock=True,
        # Only gr.Error messages (written for people) reach the page, never a traceback.
        show_error=False,
        ssr_mode=False,
        quiet=True,
        auth=access_mod.gradio_auth(settings),
        state_session_capacity=access_mod.GRADIO_SESSION_STATES,
        max_file_size=f"{settings.max_body_kb}kb",
        # Gradio's run history would keep every chat in the browser (out of reach of
        # "Delete my data") and, for a signed-in visitor naming a Hugging Face bucket in a
        # header, fetch every URL in the request into memory and upload the run there.
        run_history=False,
        # Gradio's traffic monitoring, on by default: /monitoring/summary gave anyone every
        # handler's counts and timings, and /monitoring printed the key of a dashboard that
        # lists every event's session id to the log, for whoever asked.
        enable_monitoring=False,
        app_kwargs={"middleware": [boundary]},
    )
    app.url = (
        f"http://{'127.0.0.1' if settings.host == '0.0.0.0' else settings.host}:{settings.port}/"
    )
    print(f"rlhf-chat UI on {app.url}", flush=True)
    if block:
        try:
            app.demo.block_thread()
        finally:
            app.close()
    return app
