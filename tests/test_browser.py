"""A person in a real (headless Chromium) browser: type, watch the answer stream in,
click 👍, and the like is in `rlhf-chat export --format kto`."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import tiny_env, wait_for

from chat_ui.app import serve
from rlhf_core.datasets import read_jsonl
from rlhf_core.redis_server import free_port

pytestmark = pytest.mark.browser
ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture()
def app(tiny_settings):
    settings = tiny_settings.model_copy(update={"port": free_port(), "max_new_tokens": 12})
    served = serve(settings, block=False)
    yield served
    served.close()


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium package is not installed")
def test_type_wait_like_then_export(app, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        page = browser.new_page()
        try:
            page.goto(app.url)
            expect(page.locator("#policy-badge")).to_contain_text("current policy version 0")
            box = page.locator("#message textarea")
            box.fill("Hello from a browser 👋")
            box.press("Enter")
            chat = page.locator("#chatbot")
            expect(chat).to_contain_text("Hello from a browser 👋")
            # The footer appears once the answer is finished and saved.
            expect(chat).to_contain_text("written by v0", timeout=60_000)
            expect(box).to_have_value("")
            chat.get_by_label("Like", exact=True).last.click()
            store = app.service.store
            wait_for(lambda: any(e.kind == "like" for e in store.events()), 20,
                     "the 👍 to reach the store")  # fmt: skip
        except Exception:
            page.screenshot(path=str(tmp_path / "failure.png"))
            raise
        finally:
            browser.close()

    out = tmp_path / "kto.jsonl"
    done = subprocess.run(
        [sys.executable, "-m", "chat_ui", "export", "--format", "kto", "--out", str(out)],
        env=tiny_env(app.settings), cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    rows = read_jsonl(out)
    assert len(rows) == 1 and rows[0]["label"] is True
    assert rows[0]["prompt"][-1] == {"role": "user", "content": "Hello from a browser 👋"}
    (turn,) = list(app.service.store.turns())
    assert rows[0]["completion"] == [{"role": "assistant", "content": turn.answer}]
