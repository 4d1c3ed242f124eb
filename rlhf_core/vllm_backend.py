"""The vLLM serving backend: answers stream from a vLLM OpenAI-compatible server.

``RLHF_SERVING_BACKEND=vllm`` and ``RLHF_VLLM_URL=http://host:8000`` make each UI a thin
client of one vLLM server that several UI replicas share. The server must run with LoRA
enabled and runtime adapter loading allowed::

    VLLM_ALLOW_RUNTIME_LORA_UPDATING=1 vllm serve /path/to/SmolLM2-135M-Instruct \\
        --enable-lora --max-lora-rank 16 --max-loras 4

What stays here and what is vLLM's. The prompt is built here, with the one chat encoding
(rlhf_core.chat_format, through PolicyServer.build_prompt: same trimming, same control-token
sanitising as training) and sent as token ids to ``/v1/completions``, so vLLM never applies
a chat template of its own. Sampling follows rlhf_core.generation: temperature (0 =
greedy), top-p and the token limit, with every other knob pinned neutral (vLLM otherwise
applies the model's ``generation_config.json`` defaults, a repetition penalty for
instance). Policy version N is the LoRA adapter named ``vN`` (version 0: the base model's
served name): ``load_adapter`` registers it through ``/v1/load_lora_adapter`` (an adapter
another replica registered already counts as loaded), a request names its pinned version
as its ``model``, and ``set_current`` to an older version (a rollback) unloads the newer
one through ``/v1/unload_lora_adapter`` once no answer of this replica uses it. The adapter
folder must be readable by the vLLM server (the same machine, or RLHF_ARTIFACT_DIR on a
shared disk). Batching, the KV cache and scheduling are vLLM's.

Known edge: a replica that unloads a rolled-back version can end another replica's
answer that is still being written by it (vLLM answers 404 for the unloaded name); the
reader gets a clear error and can regenerate. Versions outside the keep window are
unloaded the same way.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx

from rlhf_core.generation import Sampling
from rlhf_core.serving import BASE_VERSION, Generation, PolicyServer, adapter_name
from rlhf_core.settings import Settings

log = logging.getLogger(__name__)


class VLLMUnavailableError(RuntimeError):
    """The vLLM server could not be reached or refused a request; the message says what
    to do."""


class _Config:
    """What PolicyServer.prompt_budget reads from a model config."""

    def __init__(self, max_position_embeddings: int) -> None:
        self.max_position_embeddings = max_position_embeddings


class _Loaded:
    def __init__(self, name: str, max_len: int) -> None:
        self.name = name
        self.model = type("RemoteModel", (), {"config": _Config(max_len)})()


class VLLMPolicyServer(PolicyServer):
    """PolicyServer's interface (stream, versions, hot swap) on a remote vLLM server."""

    def __init__(
        self,
        settings: Settings,
        tokenizer: Any = None,
        keep_versions: int = 3,
        timeout_s: float = 600.0,
    ) -> None:
        if not settings.vllm_url:
            raise VLLMUnavailableError(
                "RLHF_SERVING_BACKEND=vllm needs RLHF_VLLM_URL, the base URL of a vLLM "
                "OpenAI-compatible server (for example http://127.0.0.1:8000)."
            )
        self.settings = settings
        self.url = settings.vllm_url.rstrip("/")
        self._http = httpx.Client(base_url=self.url, timeout=httpx.Timeout(timeout_s, connect=5))
        self.base_name, max_len = self._served_base()
        if tokenizer is None:
            from transformers import AutoTokenizer

            from rlhf_core.modeling import resolve_model_dir

            tokenizer = AutoTokenizer.from_pretrained(resolve_model_dir(settings))
        self.tokenizer = tokenizer
        self.loaded = _Loaded(self.base_name, max_len)  # type: ignore[assignment]
        self.model = None
        self.keep_versions = max(keep_versions, 1)
        self._peft = False
        self._versions: list[int] = []
        self._current = BASE_VERSION
        self._pins: dict[int, int] = {}
        self._generate_lock = threading.Lock()
        self._state_lock = threading.Lock()
        self._turn = threading.Condition()
        self._swaps_waiting = 0
        self._stop_ids = sorted({int(tokenizer.eos_token_id)})
        self._batcher = None

    # --- the server -----------------------------------------------------------------
    def _call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            return self._http.request(method, path, **kwargs)
        except httpx.HTTPError as error:
            raise VLLMUnavailableError(
                f"The vLLM server at {self.url} did not answer {method} {path} "
                f"({type(error).__name__}: {error}). Check that it runs and that "
                "RLHF_VLLM_URL points at it."
            ) from error

    def _served_base(self) -> tuple[str, int]:
        """The base model's served name and its context length, from /v1/models."""
        response = self._call("GET", "/v1/models")
        if response.status_code != 200:
            raise VLLMUnavailableError(
                f"{self.url}/v1/models answered {response.status_code}: {response.text[:200]}"
            )
        models = response.json().get("data", [])
        base = next((m for m in models if not m.get("parent")), None)
        if base is None:
            raise VLLMUnavailableError(f"{self.url} serves no base model: {models}")
        return base["id"], int(base.get("max_model_len") or 2048)

    def served_models(self) -> list[str]:
        return [m["id"] for m in self._call("GET", "/v1/models").json().get("data", [])]

    @property
    def max_concurrent_streams(self) -> int:
        return self.settings.max_batch_size

    def close(self) -> None:
        self._http.close()

    # --- versions ---------------------------------------------------------------------
    def _load_locked(self, version: int, adapter_dir: str, name: str) -> None:
        response = self._call(
            "POST", "/v1/load_lora_adapter", json={"lora_name": name, "lora_path": adapter_dir}
        )
        if response.status_code == 200 or "already" in response.text.lower():
            return  # another replica may have registered it first: the same adapter
        raise VLLMUnavailableError(
            f"vLLM refused to load policy version {version} from {adapter_dir} "
            f"({response.status_code}: {response.text[:300]}). The server needs "
            "--enable-lora, VLLM_ALLOW_RUNTIME_LORA_UPDATING=1, a --max-lora-rank at least "
            "the adapter's rank, and read access to the adapter folder."
        )

    def _unload(self, version: int) -> None:
        response = self._call(
            "POST", "/v1/unload_lora_adapter", json={"lora_name": adapter_name(version)}
        )
        if response.status_code != 200 and "not" not in response.text.lower():
            log.warning("vLLM did not unload v%d: %s", version, response.text[:200])
        with self._state_lock:
            if version in self._versions:
                self._versions.remove(version)
        log.info("Unloaded policy version %d from vLLM", version)

    def set_current(self, version: int) -> None:
        """Make ``version`` current; moving back to an older one (a rollback) unloads
        the newer current version once no answer here uses it."""
        previous = self._current
        super().set_current(version)
        if version < previous and previous in self._versions and not self._pins.get(previous):
            self._unload(previous)

    def _unload_old(self) -> None:
        with self._state_lock:
            keep = set(self._versions[-self.keep_versions :]) | {self._current}
            victims = [v for v in self._versions if v not in keep and not self._pins.get(v)]
        for version in victims:
            self._unload(version)

    # --- generation ---------------------------------------------------------------------
    def _request(self, gen: Generation) -> dict[str, Any]:
        sampling: Sampling = gen.sampling
        body: dict[str, Any] = {
            "model": self.base_name if gen.version == BASE_VERSION else adapter_name(gen.version),
            "prompt": gen.prompt.input_ids,
            "max_tokens": sampling.max_new_tokens,
            "temperature": sampling.temperature,
            "top_p": sampling.top_p if sampling.temperature > 0 else 1.0,
            # Pinned neutral, as rlhf_core.generation pins them for generate().
            "top_k": 0,
            "min_p": 0.0,
            "repetition_penalty": 1.0,
            "presence_penalty": 0.0,
            "frequency_penalty": 0.0,
            "min_tokens": 0,
            "stop_token_ids": self._stop_ids,
            "skip_special_tokens": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if gen.seed is not None:
            body["seed"] = int(gen.seed)
        return body

    def _run(self, gen: Generation) -> Iterator[str]:
        start = time.perf_counter()
        finish = None
        try:
            self._repin_to_current(gen)
            body = self._request(gen)
            try:
                with self._http.stream("POST", "/v1/completions", json=body) as response:
                    if response.status_code != 200:
                        response.read()
                        raise VLLMUnavailableError(
                            f"vLLM answered {response.status_code} for policy version "
                            f"{gen.version}: {response.text[:300]}. Try again."
                        )
                    for line in response.iter_lines():
                        # Cancelled (Undo, New chat, an abandoned answer) while this thread
                        # waited for the next token: close() could not reach a generator
                        # that was running, so it is checked here, at every line.
                        if gen._cancel.is_set():
                            break
                        if not line.startswith("data: ") or line == "data: [DONE]":
                            continue
                        chunk = json.loads(line[6:])
                        if chunk.get("usage"):
                            gen.new_tokens = int(chunk["usage"].get("completion_tokens", 0))
                        for choice in chunk.get("choices", []):
                            finish = choice.get("finish_reason") or finish
                            text = choice.get("text") or ""
                            if not text:
                                continue
                            now = time.perf_counter()
                            gen.token_times.append(now)
                            if gen.first_token_s is None:
                                gen.first_token_s = now - start
                            gen.text += text
                            yield gen.text
            except httpx.HTTPError as error:
                raise VLLMUnavailableError(
                    f"The vLLM server at {self.url} broke off the answer "
                    f"({type(error).__name__}: {error}). Try again."
                ) from error
        finally:
            # Leaving the with-block closes the connection: vLLM aborts the request.
            self._release(gen.version)
        gen.ended_with_eos = finish == "stop"
        gen.total_s = time.perf_counter() - start
        gen.text = gen.text.strip()
        gen.finished = True
        yield gen.text
