"""PolicyServer: streaming chat generation on one base model with hot-swappable LoRA policies.

Policy version 0 is the bare base model; version N >= 1 is a LoRA adapter published
by a training round. Adapters are loaded side by side on one ``peft.PeftModel``, so a
swap is a pointer change, not a reload, and an answer that started on version N
finishes on version N even when N+1 becomes current mid-answer. Each version lives in
an adapter slot (a PEFT adapter named ``slot0000``...); a version unloaded leaves its
slot as a spare, and the next version with the same LoRA config is copied into it
without the model lock instead of building new LoRA modules (``_load_locked``).

Concurrency. With ``RLHF_SERVING_BACKEND=batched`` (the default) answers share one
continuous-batching decode loop (rlhf_core.batching): a request joins the running batch
at the next token boundary, streams its own tokens with its own sampling settings and
pinned version (versions mix in one batch, each adapter scaled per row), and leaves when
it ends or its reader goes away. ``_generate_lock`` is then held for one decode step at
a time, so an adapter edit (a new slot) waits for at most one step.
``RLHF_SERVING_BACKEND=sequential`` keeps the older path: each request holds
``_generate_lock`` for its whole ``generate`` call and activates its pinned version inside
it (peft's ``set_adapter`` switches the whole model), one answer at a time; the serving
benchmark compares the two. ``vllm`` is rlhf_core.vllm_backend, another process.

Context: the conversation is rendered with the tokenizer's chat template; when it
exceeds the prompt budget, the oldest user/assistant turns are dropped (the system
prompt and the last user message are always kept) and the caller is told how many
messages were dropped, so the UI can say so.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

from rlhf_core.batching import ContinuousBatcher, make_slot, supports
from rlhf_core.chat_format import prompt_ids
from rlhf_core.generation import Sampling, generate_kwargs, stop_token_ids
from rlhf_core.modeling import LoadedModel
from rlhf_core.settings import Settings

log = logging.getLogger(__name__)

BASE_VERSION = 0


class ContextTooLongError(ValueError):
    """Even the system prompt plus the last user message do not fit the prompt budget."""


class UnknownVersionError(KeyError):
    """A policy version was asked for that is not loaded in this server."""


def adapter_name(version: int) -> str:
    return f"v{version}"


@dataclass
class Prompt:
    """A conversation rendered for the model, after trimming."""

    messages: list[dict[str, str]]  # what the model actually sees (trimmed)
    input_ids: list[int]
    dropped: int  # messages dropped from the front to fit the budget


@dataclass
class Generation:
    """One streamed answer. Iterate it to get the growing answer text; ``version`` is
    pinned when it is created (the policy that writes every token of it)."""

    server: PolicyServer
    prompt: Prompt
    sampling: Sampling
    version: int
    # True unless a version was asked for: the answer then takes whatever version is
    # current when its generation *starts* (not when it was queued), so a swap reaches
    # the next answer served instead of the one after every queued request.
    follow_current: bool = False
    text: str = ""
    new_tokens: int = 0
    first_token_s: float | None = None  # seconds from start to the first visible text
    total_s: float | None = None
    finished: bool = False
    # Whether the model ended the answer with EOS (False: cut at max_new_tokens or
    # stopped); stored as Turn.finished so training sees a cut answer as cut.
    ended_with_eos: bool = False
    seed: int | None = None  # batched server: the answer's own random generator seed
    token_ids: list[int] = field(default_factory=list)  # generated ids, stop token included
    # time.perf_counter() of each streamed token (inter-token latency in benchmarks)
    token_times: list[float] = field(default_factory=list, repr=False)
    _started: bool = field(default=False, repr=False)
    _cancel: threading.Event = field(default_factory=threading.Event, repr=False)
    _backend: Iterator[str] | None = field(default=None, repr=False)

    @property
    def messages(self) -> list[dict[str, str]]:
        return self.prompt.messages

    @property
    def trimmed(self) -> int:
        return self.prompt.dropped

    @property
    def tokens_per_s(self) -> float:
        if not self.total_s or not self.new_tokens:
            return 0.0
        return self.new_tokens / self.total_s

    def __iter__(self) -> Iterator[str]:
        if self._started:
            raise RuntimeError("A Generation can be iterated once; call stream() again.")
        self._started = True
        self._backend = self.server._run(self)
        yield from self._backend

    def cancel(self) -> None:
        """Stop writing this answer (its reader is gone), on every backend: the batched decode
        drops it at its next step; the backend's stream is closed, which runs its cleanup
        (the version pin, a vLLM connection). The reader's own ``close`` does the same; this
        is for a reader left suspended and never closed."""
        self._cancel.set()
        batcher = getattr(self.server, "_batcher", None)
        if batcher is not None:
            batcher.poke()
        backend = self._backend
        if backend is not None:
            try:
                backend.close()
            except ValueError:
                pass  # running right now in its reader's thread: _cancel stops it there

    def consume(self) -> Generation:
        """Run to the end without streaming; returns self."""
        for _ in self:
            pass
        return self


class PolicyServer:
    """Serve chat answers from the base model plus the current policy adapter."""

    def __init__(self, loaded: LoadedModel, settings: Settings, keep_versions: int = 3) -> None:
        self.loaded = loaded
        self.settings = settings
        self.tokenizer = loaded.tokenizer
        self.keep_versions = max(keep_versions, 1)
        self.model: Any = loaded.model  # becomes a PeftModel at the first adapter
        self._peft = False
        self._versions: list[int] = []  # loaded adapter versions, oldest first
        self._current = BASE_VERSION
        self._pins: dict[int, int] = {}  # version -> answers waiting or in flight
        # Adapter slots: the PEFT adapter (module set) that holds each loaded version, and
        # slots that hold none any more, whose modules the next version's weights are
        # copied into (see _load_locked).
        self._slots: dict[int, str] = {}
        self._spare: list[str] = []
        self._slots_made = 0
        self._views: dict[str, dict[str, torch.Tensor]] = {}  # slot -> _slot_views
        self._generate_lock = threading.Lock()  # one generate (and adapter edit) at a time
        self._state_lock = threading.Lock()  # guards _current/_versions/_pins bookkeeping
        self._turn = threading.Condition()  # lets an adapter load skip the request queue
        self._swaps_waiting = 0
        self._stop_ids = stop_token_ids(loaded.model, self.tokenizer)
        self._batcher: ContinuousBatcher | None = None
        if settings.serving_backend == "batched":
            if supports(loaded.model):
                self._batcher = ContinuousBatcher(self, settings.max_batch_size)
            else:
                log.warning(
                    "%s uses sliding-window or linear attention, which the batched server "
                    "does not join; serving one answer at a time.",
                    loaded.name,
                )

    @property
    def batched(self) -> bool:
        return self._batcher is not None

    @property
    def max_concurrent_streams(self) -> int:
        """How many answers are usefully streamed at once (the web layer's limit)."""
        return self._batcher.max_batch_size if self._batcher is not None else 1

    def close(self) -> None:
        """Stop the decode loop (answers in flight end with an error)."""
        if self._batcher is not None:
            self._batcher.stop()

    # --- versions ------------------------------------------------------------
    @property
    def current_version(self) -> int:
        return self._current

    @property
    def loaded_versions(self) -> list[int]:
        return [BASE_VERSION, *self._versions]

    def load_adapter(self, version: int, adapter_dir: str) -> None:
        """Load a policy adapter beside the ones already loaded (no swap yet)."""
        if version <= BASE_VERSION:
            raise ValueError(f"Adapter versions start at 1; version {version} is the base model.")
        if version in self._versions:
            return
        self._load_locked(version, adapter_dir, adapter_name(version))
        with self._state_lock:
            self._versions.append(version)
        log.info("Loaded policy version %d from %s", version, adapter_dir)
        # Also here, not only when the current version changes: a canary that rolls back
        # candidate after candidate loads each one and never changes the current version,
        # and every rejected candidate kept its slot (a new one built once the spares ran out).
        self._unload_old()

    def _load_locked(self, version: int, adapter_dir: str, name: str) -> None:
        """Put ``adapter_dir``'s weights into an adapter slot of the model.

        A spare slot (an unloaded older version's) whose LoRA config equals the new
        adapter's takes the new weights by copy (``_fill_spare``), without the model
        lock: no forward reads a spare slot (a version's slot becomes spare only once no
        answer is pinned to it and it is not current, and a version is mapped to its new
        slot only after the copy), so the decode loop runs on meanwhile. Building new
        LoRA modules instead (``add_adapter``: walk the model, create and initialise a
        pair of matrices per target layer) edits the module tree, so it holds the lock,
        and it took about 4x as long as the copy on SmolLM2: with a new module set at
        every publish, every publish stalled every answer in flight. A slot with another
        config (rank, alpha, targets) is deleted and a fresh one built. ``name`` is
        vLLM's per-version name; here slots have their own names (``slot0000``...),
        mapped from versions by ``_slots``."""
        from peft import PeftConfig
        from peft.utils import load_peft_weights

        config = PeftConfig.from_pretrained(adapter_dir)
        weights = load_peft_weights(adapter_dir, device=str(self.loaded.model.device))
        slot = self._fill_spare(config, weights)
        if slot is None:
            with self._model_edit():
                slot = self._new_slot(adapter_dir)
        with self._state_lock:
            self._slots[version] = slot

    @contextlib.contextmanager
    def _model_edit(self) -> Iterator[None]:
        """Hold the model lock to edit adapters, ahead of the requests (or the decode
        loop's next step) waiting for it: an edit waits for at most one step."""
        with self._turn:
            self._swaps_waiting += 1
        try:
            with self._generate_lock:
                yield
        finally:
            with self._turn:
                self._swaps_waiting -= 1
                self._turn.notify_all()

    def _fill_spare(self, config: Any, weights: dict[str, torch.Tensor]) -> str | None:
        """Copy the adapter into a spare slot with the same config; None when there is
        no such slot (spares of another config are deleted on the way)."""
        from peft.utils import set_peft_model_state_dict

        while True:
            with self._state_lock:
                if not self._spare:
                    return None
                slot = self._spare.pop()
            if _same_lora(self.model.peft_config[slot], config):
                views = self._slot_views(slot)
                if views.keys() == weights.keys() and all(
                    views[k].shape == weights[k].shape for k in views
                ):
                    # The same copies as below, without its walks of the whole model: a few
                    # ms of Python instead of ~40 (the GIL the decode loop also needs).
                    with torch.no_grad():
                        for key, view in views.items():
                            view.copy_(weights[key])
                    return slot
                try:
                    result = set_peft_model_state_dict(self.model, weights, adapter_name=slot)
                except Exception:
                    self._drop_slot(slot)  # half-overwritten: never serve from it
                    raise
                # A tensor the folder lacks would keep the old version's values.
                missing = [k for k in result.missing_keys if f".{slot}." in k]
                if not missing:
                    return slot
                log.warning("adapter lacks %d tensors of its config", len(missing))
            self._drop_slot(slot)

    def _slot_views(self, slot: str) -> dict[str, torch.Tensor]:
        """A slot's weights under the keys an adapter folder holds them by (PEFT's
        ``get_peft_model_state_dict``, what ``save_pretrained`` writes), as tensors that
        share storage with the slot's parameters; empty when they do not (the caller then
        loads through ``set_peft_model_state_dict``). Built once per slot."""
        if slot not in self._views:
            from peft.utils import get_peft_model_state_dict

            views = get_peft_model_state_dict(self.model, adapter_name=slot)
            params = {
                p.data_ptr(): p.shape for n, p in self.model.named_parameters() if f".{slot}." in n
            }
            shared = len(views) == len(params) and all(
                params.get(t.data_ptr()) == t.shape for t in views.values()
            )
            self._views[slot] = views if shared else {}
        return self._views[slot]

    def _drop_slot(self, slot: str) -> None:
        with self._model_edit():
            self._delete_slot(slot)

    def _slot_name(self) -> str:
        # Equal lengths: no name is a substring of another (PEFT matches missing keys so).
        self._slots_made += 1
        return f"slot{self._slots_made - 1:04d}"

    def _new_slot(self, adapter_dir: str) -> str:
        """Build a slot holding ``adapter_dir`` (model lock held). The first one also
        builds ``keep_versions`` spares of its config: the versions that follow are then
        copied into slots without the lock from the start, instead of each of the next
        few publishes stopping the answers in flight while its slot is built (the pool
        then stays the same size: a version unloaded leaves its slot as a spare). A few
        MB each for SmolLM2 at r=16."""
        slot = self._slot_name()
        try:
            if not self._peft:
                from peft import PeftModel

                self.model = PeftModel.from_pretrained(
                    self.loaded.model, adapter_dir, adapter_name=slot, is_trainable=False
                )
                self._peft = True
                config = self.model.peft_config[slot]
                for _ in range(self.keep_versions):
                    spare = self._slot_name()
                    self.model.add_adapter(spare, copy.deepcopy(config))
                    self._slot_views(spare)  # here, where the load stalls anyway
                    with self._state_lock:
                        self._spare.append(spare)
            else:
                self.model.load_adapter(adapter_dir, adapter_name=slot, is_trainable=False)
        except Exception:
            if self._peft and slot in self.model.peft_config:
                self._delete_slot(slot)
            raise
        self.model.eval()
        return slot

    def _delete_slot(self, slot: str) -> None:
        """Remove a slot's modules (model lock held). PEFT warns when the active adapter
        is deleted: point it at another slot first."""
        if self.model.active_adapter == slot:
            others = [name for name in self.model.peft_config if name != slot]
            if others:
                self.model.set_adapter(others[-1])
        self.model.delete_adapter(slot)
        self._views.pop(slot, None)

    def adapter_for(self, version: int) -> str:
        """The PEFT adapter name that holds ``version`` (loaded, version >= 1)."""
        return self._slots[version]

    def set_current(self, version: int) -> None:
        """Make ``version`` the one new answers use; answers in flight keep theirs."""
        if version != BASE_VERSION and version not in self._versions:
            raise UnknownVersionError(
                f"Policy version {version} is not loaded; call load_adapter({version}, dir) first."
            )
        with self._state_lock:
            self._current = version
        self._unload_old()

    def swap_to(self, version: int, adapter_dir: str | None = None) -> None:
        """Load (if needed) and make current in one call; ``adapter_dir`` may be None
        for version 0 or an already loaded version."""
        if version != BASE_VERSION and version not in self._versions:
            if adapter_dir is None:
                raise UnknownVersionError(
                    f"Policy version {version} is not loaded and no adapter folder was given."
                )
            self.load_adapter(version, adapter_dir)
        self.set_current(version)

    def _unload_old(self) -> None:
        """Keep the current version and the few most recently loaded ones (for a quick
        rollback); older versions that no answer is using give up their slot. Up to
        ``keep_versions`` slots stay in the model as spares for the next versions'
        weights, the others are deleted.

        Picking the victims and taking them out of ``_versions`` is one step under the
        state lock: a request pinning a victim in between would otherwise be served by
        a slot that is being overwritten (it gets UnknownVersionError instead)."""
        with self._state_lock:
            keep = set(self._versions[-self.keep_versions :]) | {self._current}
            victims = [v for v in self._versions if v not in keep and not self._pins.get(v)]
            for version in victims:
                self._versions.remove(version)
            freed = [self._slots.pop(v) for v in victims if v in self._slots]
        for slot in freed:
            with self._state_lock:
                keep_spare = len(self._spare) < self.keep_versions
                if keep_spare:
                    self._spare.append(slot)  # its weights are overwritten before any use
            if not keep_spare:
                self._drop_slot(slot)
        for version in victims:
            log.info("Unloaded policy version %d", version)

    # --- prompts -------------------------------------------------------------
    def prompt_budget(self, max_new_tokens: int) -> int:
        limit = getattr(self.loaded.model.config, "max_position_embeddings", None) or 1 << 30
        return max(1, min(self.settings.max_context_tokens, limit - max_new_tokens))

    def _encode(self, messages: list[dict[str, str]]) -> list[int]:
        # The one chat encoding (control tokens a user types stay text), shared with training.
        return prompt_ids(self.tokenizer, messages)

    def build_prompt(self, messages: list[dict[str, str]], max_new_tokens: int) -> Prompt:
        """Render the conversation, dropping the oldest exchanges until it fits the budget.

        The conversation may start at the first message or at any later user message (a
        trimmed chat still starts with a user turn; the last message, a user's, always
        stays). Fewer messages never render to more tokens, so the latest start that fits
        is found by bisection: O(log n) encodings of the chat, not one per dropped
        exchange (a chat of hundreds of exchanges re-encoded once per drop cost seconds of
        CPU per message, for every message after it grew that long)."""
        if not messages or messages[-1].get("role") != "user":
            raise ValueError("The conversation must end with a user message.")
        clean = [{"role": m["role"], "content": str(m["content"])} for m in messages]
        system = clean[:1] if clean[0]["role"] == "system" else []
        rest = clean[len(system) :]
        budget = self.prompt_budget(max_new_tokens)
        starts = [0] + [i for i, m in enumerate(rest) if i > 0 and m["role"] == "user"]
        encoded: dict[int, list[int]] = {}

        def fits(k: int) -> bool:  # the chat from starts[k] on fits the budget
            encoded[k] = self._encode(system + rest[starts[k] :])
            return len(encoded[k]) <= budget

        low, high = 0, len(starts) - 1  # the answer lies in [low, high]: high always kept
        if not fits(low):
            while low + 1 < high:  # invariant: starts[low] does not fit
                middle = (low + high) // 2
                if fits(middle):
                    high = middle
                else:
                    low = middle
            low = high
            if low not in encoded:
                fits(low)
        ids = encoded[low]
        if len(ids) > budget:
            raise ContextTooLongError(
                f"The message is too long for the model: {len(ids)} prompt tokens with the "
                f"system prompt, the limit is {budget} (RLHF_MAX_CONTEXT_TOKENS). "
                f"Shorten the message or the system prompt."
            )
        return Prompt(messages=system + rest[starts[low] :], input_ids=ids, dropped=starts[low])

    # --- generation ----------------------------------------------------------
    def stream(
        self,
        messages: list[dict[str, str]],
        sampling: Sampling | dict[str, Any] | None = None,
        version: int | None = None,
        seed: int | None = None,
    ) -> Generation:
        """Prepare one answer on the current (or the given) version. Iterate the
        result to stream the growing text; raises ContextTooLongError up front.
        ``seed`` fixes the batched server's sampling for this answer alone."""
        params = Sampling.coerce(sampling, self.settings)
        prompt = self.build_prompt(messages, params.max_new_tokens)
        with self._state_lock:
            pinned = self._current if version is None else version
            if pinned != BASE_VERSION and pinned not in self._versions:
                raise UnknownVersionError(f"Policy version {pinned} is not loaded.")
            self._pins[pinned] = self._pins.get(pinned, 0) + 1
        return Generation(
            server=self, prompt=prompt, sampling=params, version=pinned,
            follow_current=version is None, seed=seed,
        )  # fmt: skip

    def generate(
        self, messages: list[dict[str, str]], sampling: Sampling | dict[str, Any] | None = None
    ) -> Generation:
        """A whole answer at once (for scripts and tests)."""
        return self.stream(messages, sampling).consume()

    def _release(self, version: int) -> None:
        with self._state_lock:
            self._pins[version] -= 1
            if not self._pins[version]:
                del self._pins[version]

    def _run(self, gen: Generation) -> Iterator[str]:
        if self._batcher is not None:
            yield from self._run_batched(gen)
            return
        streamer = _TimedStreamer(
            self.tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=600
        )
        gen.token_times = streamer.times
        outcome: dict[str, Any] = {}
        start = time.perf_counter()

        def work() -> None:
            try:
                # A pending adapter load goes before the requests still waiting.
                with self._turn:
                    self._turn.wait_for(lambda: not self._swaps_waiting)
                with self._generate_lock:
                    outcome["tokens"], outcome["eos"] = self._generate_locked(gen, streamer)
            except BaseException as error:  # surfaced in the consumer thread below
                outcome["error"] = error
                streamer.on_finalized_text("", stream_end=True)

        thread = threading.Thread(target=work, name="policy-generate", daemon=True)
        try:
            thread.start()
            yield from _read_into(gen, streamer, start)
            thread.join()
        finally:
            # Runs also when the consumer stops early (a closed browser tab): the
            # generate thread is told to stop and releases the lock by itself.
            gen._cancel.set()
            if not thread.is_alive():
                self._release(gen.version)
            else:
                threading.Thread(
                    target=lambda: (thread.join(), self._release(gen.version)), daemon=True
                ).start()
        if "error" in outcome:
            raise outcome["error"]
        gen.new_tokens = outcome.get("tokens", 0)
        gen.ended_with_eos = outcome.get("eos", False)
        gen.total_s = time.perf_counter() - start
        gen.text = gen.text.strip()
        gen.finished = True
        yield gen.text

    def _run_batched(self, gen: Generation) -> Iterator[str]:
        """Stream one answer from the shared decode loop; the loop releases the pin."""
        assert self._batcher is not None
        streamer = _TimedStreamer(
            self.tokenizer, skip_prompt=False, skip_special_tokens=True, timeout=600
        )
        gen.token_times = streamer.times
        slot = make_slot(gen, streamer, self._stop_ids, gen.seed)
        start = time.perf_counter()
        self._batcher.submit(slot)
        try:
            yield from _read_into(gen, streamer, start)
        finally:
            # Also when the reader stops early (a closed tab): the loop drops the slot
            # at its next step and releases the version pin there.
            if not slot.released:
                gen._cancel.set()
                self._batcher.poke()
        if slot.error is not None:
            raise slot.error
        # Counted as generate counts them: the stop token is a generated token.
        gen.token_ids = slot.tokens + ([slot.stop_token] if slot.stop_token is not None else [])
        gen.new_tokens = len(gen.token_ids)
        gen.ended_with_eos = slot.eos
        gen.total_s = time.perf_counter() - start
        gen.text = gen.text.strip()
        gen.finished = True
        yield gen.text

    def _repin_to_current(self, gen: Generation) -> None:
        """Called with the generate lock held, as the answer starts."""
        with self._state_lock:
            if not gen.follow_current or gen.version == self._current:
                return
            self._pins[gen.version] -= 1
            if not self._pins[gen.version]:
                del self._pins[gen.version]
            gen.version = self._current
            self._pins[gen.version] = self._pins.get(gen.version, 0) + 1

    def _generate_locked(self, gen: Generation, streamer: TextIteratorStreamer) -> tuple[int, bool]:
        """Runs generate; returns (new tokens, whether the last one is an EOS)."""
        self._repin_to_current(gen)
        device = self.loaded.model.device
        input_ids = torch.tensor([gen.prompt.input_ids], device=device)
        # The same arguments as PPO's rollouts and the KL gate (rlhf_core.generation).
        kwargs = generate_kwargs(
            gen.sampling, eos_token_id=self._stop_ids, pad_token_id=self.tokenizer.pad_token_id
        )
        kwargs.update(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            streamer=streamer,
            stopping_criteria=StoppingCriteriaList([_Cancelled(gen._cancel)]),
        )
        with torch.inference_mode():
            if gen.version == BASE_VERSION:
                if self._peft:
                    with self.model.disable_adapter():
                        out = self.model.generate(**kwargs)
                else:
                    out = self.model.generate(**kwargs)
            else:
                self.model.set_adapter(self.adapter_for(gen.version))
                out = self.model.generate(**kwargs)
        new_tokens = int(out.shape[1] - input_ids.shape[1])
        gen.token_ids = out[0, input_ids.shape[1] :].tolist()
        return new_tokens, new_tokens > 0 and int(out[0, -1]) in self._stop_ids


def _same_lora(a: Any, b: Any) -> bool:
    """Whether two PEFT configs build the same modules with the same scaling (so one's
    weights can be copied into the other's slot); fields that only describe where an
    adapter came from or how it was trained do not count."""
    ignore = {"inference_mode", "base_model_name_or_path", "revision", "peft_version"}

    def shape(config: Any) -> dict[str, Any]:
        items = config.to_dict().items()
        return {k: (sorted(v) if isinstance(v, set) else v) for k, v in items if k not in ignore}

    return shape(a) == shape(b)


class _TimedStreamer(TextIteratorStreamer):
    """A TextIteratorStreamer that also notes when each generated token arrived."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.times: list[float] = []

    def put(self, value: torch.Tensor) -> None:
        if not (self.skip_prompt and self.next_tokens_are_prompt):
            self.times.extend([time.perf_counter()] * value.numel())
        super().put(value)


def _read_into(gen: Generation, streamer: TextIteratorStreamer, start: float) -> Iterator[str]:
    """Append each streamed chunk to ``gen.text`` and yield the text so far; notes the time
    to the first non-empty chunk (``start`` is a ``time.perf_counter()`` reading)."""
    for chunk in streamer:
        if not chunk:
            continue
        if gen.first_token_s is None:
            gen.first_token_s = time.perf_counter() - start
        gen.text += chunk
        yield gen.text


class _Cancelled(StoppingCriteria):
    """Stops generate when the reader went away, so the lock frees up at once."""

    def __init__(self, flag: threading.Event) -> None:
        self.flag = flag

    def __call__(
        self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any
    ) -> torch.Tensor:
        stop = self.flag.is_set()
        return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)
