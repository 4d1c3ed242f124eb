"""The canary with real parts: the tiny model serving two versions, the Gradio app driven
through gradio_client, a Celery worker subprocess deciding, and the arena in Chromium."""

from __future__ import annotations

import shutil
import time

import pytest
from gradio_client import Client

from chat_ui.handlers import ChatService, InputError
from chat_ui.training import arena_pair, leaderboard_rows
from rlhf_core.datasets import export_rows, preference_pairs, resolve_events
from rlhf_core.feedback import FeedbackStore
from rlhf_core.redis_server import connect, free_port
from rlhf_core.registry import Registry
from rlhf_core.serving import PolicyServer
from tests.conftest import wait_for
from tests.test_canary import publish
from tests.test_registry import adapters  # noqa: F401  (fixture)
from tests.test_worker import workers  # noqa: F401  (fixture)

SAMPLING = (1.0, 0.9, 6)  # temperature, top_p, max_new_tokens


def test_arena_pick_is_a_battle_a_pair_and_two_votes(tiny_settings, tiny_model, adapters):  # noqa: F811
    store = FeedbackStore(connect(tiny_settings))
    registry = Registry(store.redis, tiny_settings)
    policy = PolicyServer(tiny_model, tiny_settings)
    service = ChatService(
        tiny_settings, policy, store, arena_versions=lambda: arena_pair(policy, None)
    )
    with pytest.raises(InputError, match="only one so far"):
        list(service.arena_send("s1", "hi"))
    v1 = publish(registry, adapters[1][0])
    policy.load_adapter(v1, str(registry.materialize(v1)))
    assert arena_pair(policy, None) == (0, v1) or arena_pair(policy, None) == (v1, 0)
    with pytest.raises(InputError, match="Send a message in the arena first"):
        service.arena_pick("s1", "a")
    updates = list(service.arena_send("s1", "Which is better?", None, {"max_new_tokens": 6}))
    assert updates[-1].done and updates[-1].versions is None  # anonymous until the pick
    # One answer at a time per chat: not a second battle, nor a send, while one is answered.
    battle = service.arena_send("s1", "Which is better?", None, {"max_new_tokens": 32})
    next(battle)
    with pytest.raises(InputError, match="still being written in this chat"):
        list(service.arena_send("s1", "Another?", None, {"max_new_tokens": 4}))
    with pytest.raises(InputError, match="still being written in this chat"):
        list(service.send("s1", "A chat message", None, {"max_new_tokens": 4}))
    list(battle)
    arena = service.session("s1").arena
    assert sorted(arena["versions"]) == [0, v1]
    with pytest.raises(InputError, match="Unknown pick"):
        service.arena_pick("s1", "draw")
    picked = service.arena_pick("s1", "b")
    assert picked.versions == arena["versions"] and picked.picked == "b"
    again = service.arena_pick("s1", "a")  # a second click changes nothing
    assert again.picked == "b" and "already picked" in again.notices[0]

    (battle,) = store.battles()
    assert battle["outcome"] == "b" and battle["turn_a"] == arena["turns"][0]
    states = resolve_events(store.events())
    assert states[arena["turns"][0]].vote == "dislike" and states[arena["turns"][1]].vote == "like"
    # The pick is a preference pair for the reward model (B's answer over A's)...
    turns = store.get_turns(arena["turns"])
    (pair,) = preference_pairs(turns, store.events())
    assert pair["chosen_turn_id"] == arena["turns"][1]
    assert pair["chosen"] == turns[arena["turns"][1]].answer
    # ...and the arena export has it with the versions.
    (row,) = export_rows(store, "arena")
    assert row["outcome"] == "b" and row["chosen"][0]["content"] == turns[arena["turns"][1]].answer
    assert (row["version_a"], row["version_b"]) == arena["versions"]


def test_an_arena_pick_trains_the_reward_model_as_a_pair_in_a_round(tiny_settings, tiny_model):
    """Issue 13 (the pick "is a preference pair for the reward model"): a pick made through
    the arena handlers reaches the next round's reward training as one pair, winner over
    loser (source "arena"); a tie on the same message in the same round is two labels and
    no pair. (Before, the tie's two 👍 paired with the first pick's loser: three pairs.)"""
    from rlhf_core.datasets import is_heldout
    from rlhf_core.rounds import run_round
    from tests.test_rounds import _spy

    settings = tiny_settings.model_copy(update={"reward_epochs": 1, "temperature": 1.0})
    client = connect(settings)
    store = FeedbackStore(client)
    # Two answers of the base model (version 0 twice: the versions do not matter here).
    service = ChatService(settings, PolicyServer(tiny_model, settings), store,
                          arena_versions=lambda: (0, 0))  # fmt: skip
    system = [{"role": "system", "content": settings.system_prompt}] * bool(settings.system_prompt)
    messages = [m for m in (f"Arena question {i}?" for i in range(100))
                if not is_heldout([*system, {"role": "user", "content": m}])][:1]  # fmt: skip
    picks = {}
    for outcome in ("a", "tie"):
        list(service.arena_send("s1", messages[0], None, {"max_new_tokens": 8}))
        arena = service.session("s1").arena
        assert service.arena_pick("s1", outcome).picked == outcome
        picks[outcome] = store.get_turns(arena["turns"])[arena["turns"][0]], store.get_turns(
            arena["turns"])[arena["turns"][1]]  # fmt: skip
    calls: list[dict] = []
    outcome = run_round(settings, client, tiny_model, consumer_name="w1",
                        run_training_round=_spy(calls))  # fmt: skip
    assert outcome.status == "published", outcome.reason
    (call,) = calls
    (pair,) = call["pairs"]
    winner, loser = picks["a"]
    assert pair["source"] == "arena" and pair["messages"][-1]["content"] == messages[0]
    assert (pair["chosen"], pair["rejected"]) == (winner.answer, loser.answer)
    assert sorted(p["label"] for p in call["pointwise"]) == [0.0, 1.0, 1.0, 1.0]
    # The reward model trained on it: its pair loss is in the round's metrics.
    assert outcome.metrics["reward/pair_loss"] > 0


def test_worse_candidate_is_rolled_back_by_the_worker_through_the_ui(
    tiny_settings,
    adapters,  # noqa: F811
    workers,  # noqa: F811
):
    """Users chat through the real app; the candidate gets 👎 and the current version 👍;
    the worker's canary loop rolls the candidate back, and the UI serves everyone the
    current version again."""
    from chat_ui.app import serve

    settings = tiny_settings.model_copy(
        update={"port": free_port(), "train_every": 10_000, "max_new_tokens": 6}
    )
    client = connect(settings)
    registry = Registry(client, settings)
    v1 = publish(registry, adapters[1][0])
    app = serve(settings, block=False)
    try:
        worker = workers(
            "canary", settings.model_copy(update={"reward_epochs": 1, "lock_ttl_s": 3.0}),
            RLHF_CANARY_CHECK_S="0.5", RLHF_CANARY_BURN_IN="8", RLHF_TRAIN_EVERY="10000",
        )  # fmt: skip
        wait_for(lambda: app.watcher.swaps and app.service.policy.current_version == v1, 60,
                 "the UI to serve v1")  # fmt: skip
        v2 = publish(registry, adapters[2][0], share=0.5)
        assert registry.get(v2)["published_as"] == "candidate" and registry.current() == v1
        wait_for(lambda: (app.watcher.candidate or {}).get("version") == v2, 60,
                 "the UI to load the candidate")  # fmt: skip

        served = {v1: 0, v2: 0}
        users: list[Client] = []
        deadline = time.monotonic() + 300
        while registry.candidate() is not None:
            assert time.monotonic() < deadline, worker.tail()
            # A new person now and then, so both arms get people.
            if len(users) < 12 and (not users or min(served.values()) < 8):
                users.append(Client(app.url, verbose=False))
            for user in users:
                if registry.candidate() is None:
                    break
                _, answers, _, _ = user.predict("Hello", "", *SAMPLING, api_name="/send")
                version = answers[-1]["version"]
                # The candidate's answers are bad (👎), the current one's good (👍).
                user.predict(-1, "dislike" if version == v2 else "like", api_name="/vote")
                served[version] += 1
        (decision,) = registry.decisions()
        assert decision["action"] == "rollback" and decision["by"] == "automatic"
        assert decision["version"] == v2 and registry.current() == v1
        numbers = decision["numbers"]
        assert (
            numbers["candidate_likes"] == 0
            and numbers["baseline_likes"] == numbers["baseline_votes"]
        )
        assert numbers["interval"][1] < 0
        # Every person is served the current version again.
        wait_for(lambda: app.watcher.candidate is None, 30, "the UI to drop the candidate")
        for user in users:
            _, answers, _, _ = user.predict("Again", "", *SAMPLING, api_name="/send")
            assert answers[-1]["version"] == v1
        # The Training tab says so.
        from chat_ui.training import ab_markdown
        from rlhf_core import canary

        assert "No candidate out" in ab_markdown(canary.status(client, settings))
    finally:
        app.close()


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.browser
@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium package is not installed")
def test_arena_in_the_browser(tiny_settings, adapters, tmp_path):  # noqa: F811
    from playwright.sync_api import expect, sync_playwright

    from chat_ui.app import serve

    settings = tiny_settings.model_copy(update={"port": free_port(), "max_new_tokens": 8})
    client = connect(settings)
    registry = Registry(client, settings)
    v1 = publish(registry, adapters[1][0])
    v2 = publish(registry, adapters[2][0], share=0.5)
    app = serve(settings, block=False)
    try:
        wait_for(
            lambda: app.service.policy.current_version == v1
            and (app.watcher.candidate or {}).get("version") == v2,
            60, "the UI to serve v1 and load the candidate v2",
        )  # fmt: skip
        with sync_playwright() as p:
            browser = p.chromium.launch(
                executable_path=CHROMIUM,
                args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"],
            )
            page = browser.new_page()
            try:
                page.goto(app.url)
                page.get_by_role("tab", name="Arena").click()
                box = page.locator("#arena-message textarea")
                box.fill("Tell me something")
                page.locator("#arena-send").click()
                expect(page.locator("#arena-result")).to_contain_text(
                    "Pick the better answer", timeout=60_000
                )
                page.locator("#arena-pick-a").click()
                expect(page.locator("#arena-result")).to_contain_text(
                    "Answer A was written by", timeout=20_000
                )
                store = FeedbackStore(client)
                wait_for(lambda: store.battles(), 20, "the pick to reach the store")
                (battle,) = store.battles()
                assert battle["outcome"] == "a"
                # The arena compares the candidate with the current version.
                assert sorted((battle["version_a"], battle["version_b"])) == [v1, v2]
                text = page.locator("#arena-result").inner_text()
                assert f"v{battle['version_a']}" in text.split("answer B")[0]
                # The Training tab: the candidate, the pick as one vote each, the leaderboard.
                page.get_by_role("tab", name="Training").click()
                ab = page.locator("#ab-status")
                expect(ab).to_contain_text(f"Candidate v{v2} serves 50% of users", timeout=20_000)
                winner, loser = (v1, v2) if battle["version_a"] == v1 else (v2, v1)
                expect(ab).to_contain_text(f"v{winner}")
                rows = leaderboard_rows(store)
                assert [r["version"] for r in rows] == [winner, loser]
                board = page.locator("#leaderboard")
                expect(board).to_contain_text(rows[0]["95% interval"], timeout=20_000)
            except Exception:
                page.screenshot(path=str(tmp_path / "failure.png"))
                raise
            finally:
                browser.close()
    finally:
        app.close()
