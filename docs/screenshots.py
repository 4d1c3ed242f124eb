"""Take the README's screenshots: the chat and the Training tab, in headless Chromium.

    RLHF_MODEL_CACHE_DIR=/work/model-cache .venv/bin/python docs/screenshots.py

Starts its own Valkey and the app on the default model (the bundled SmolLM2), asks one
question, likes the answer, and saves docs/chat.png and docs/training.png. Needs
Debian's chromium (`apt-get install -y chromium`) and Playwright (a dev dependency).
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    from playwright.sync_api import expect, sync_playwright

    from chat_ui.app import serve
    from rlhf_core.redis_server import EmbeddedValkey, free_port
    from rlhf_core.settings import Settings

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        sys.exit("Install Debian's chromium first: apt-get install -y chromium")
    with tempfile.TemporaryDirectory() as tmp, EmbeddedValkey(Path(tmp) / "valkey") as valkey:
        settings = Settings(
            data_dir=Path(tmp) / "data", redis_url=valkey.url, port=free_port(),
            max_new_tokens=48, temperature=0.2,
            model_cache_dir=os.environ.get("RLHF_MODEL_CACHE_DIR") or None,
        )  # fmt: skip
        app = serve(settings, block=False, watch_versions=False)
        try:
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
                page = browser.new_page(viewport={"width": 1280, "height": 860})
                page.goto(app.url)
                box = page.locator("#message textarea")
                box.fill("What is the capital of France?")
                box.press("Enter")
                chat = page.locator("#chatbot")
                expect(chat).to_contain_text("written by v0", timeout=300_000)
                chat.get_by_label("Like", exact=True).last.click()
                page.wait_for_timeout(1500)
                page.screenshot(path=str(HERE / "chat.png"))
                page.get_by_role("tab", name="Training").click()
                expect(page.locator("#training-status")).to_contain_text(
                    "Serving version", timeout=60_000
                )
                page.wait_for_timeout(2500)
                page.screenshot(path=str(HERE / "training.png"), full_page=True)
                browser.close()
        finally:
            app.close()
    print(f"wrote {HERE / 'chat.png'} and {HERE / 'training.png'}")


if __name__ == "__main__":
    main()
