"""Continuous batching for :class:`~rlhf_core.serving.PolicyServer`: one decode loop,
requests join and leave it at token boundaries.

One thread owns the model and runs a loop of steps. Each step:

1. drops the requests whose reader went away (a closed tab, Undo) and the ones done;
2. admits waiting requests, each given a row of the batch's key/value cache;
3. runs ONE forward over a packed row: every running answer's last token, and the
   prompts (or the next ``prefill_chunk`` tokens of them) of the answers joining; each
   answer whose prompt is now in the cache samples its next token with its own
   settings and random generator.

A new chat therefore waits at most one step, never for the longest answer in the
batch, and every answer streams its own tokens through its own ``TextIteratorStreamer``.

Why one packed forward per step. Before, a step prefilled the joining prompts in a
forward of their own and then ran the running answers' decode forward: on the 2-core
CPU both are bound by reading the weights, not by arithmetic (a 25-token prefill of
SmolLM2 took about 1.1-1.3x a decode step of 8 answers), so every join cost the batch a
second pass over the weights -- about 30% of the loop's time with 8 chats of 24-token
answers, in the hot-swap benchmark's profile -- and every answer grew longer by the
joins it lived through, which is also how long a new version waits for the next message
to reach it. Packed, the prompt's tokens ride along with the running answers' next
tokens (test_serving: one forward a step). A long prompt joins ``prefill_chunk`` tokens
at a time, so it delays the others' next token by one chunk, not by its whole prefill.

The packed tokens are written into a cache with a row per answer (``_RowLayer``, room
for its prompt and its longest answer), and each answer's tokens attend to their own row
only (``_packed_attention``, registered with transformers' ``AttentionInterface``): the
decode tokens in one batched attention over the rows, as an unpacked batch would, each
prompt chunk over its own row. A dense block-diagonal mask over one packed cache row
would make every token pay for every answer's keys (3.4x a decode step at 8 answers of
900 tokens, measured), and one attention call per answer cost about 1 ms each on the
loaded 2-core CPU.

Versions in one batch, not grouped per version: every LoRA layer runs the base weights
once for the whole batch and adds each adapter's low-rank delta to its own tokens only.
Grouping the batch by version and running one forward per version would multiply the
base model's cost by the number of versions in flight -- two or three during every swap,
exactly when a new version should reach people quickly. An answer keeps the version it
joined with (its pin also keeps the adapter loaded) even when another becomes current.
A step whose tokens are all on one version (every step outside a swap) runs that
version plainly, as the one-at-a-time server does. A step with several versions (nearly
every step while versions are published every few seconds: the answers started before
a publish are still running) makes every adapter of the batch active with a per-token
scaling, the adapter's own on its tokens and 0 elsewhere (:func:`_row_scaled`). PEFT's
per-request ``adapter_names`` selects adapters per batch row, not per token of a packed
row (and was about 30% slower than a one-version step at 8 rows). LoRA layers the
scaling does not cover (variants such as DoRA, non-Linear LoRA layers) get one forward
per version instead.

Swaps: the loop holds the server's model lock for one step at a time, and yields
to a waiting adapter edit before taking it again, so building a new adapter slot beside
the running batch waits for at most one step. Most versions need no lock at all: their
weights are copied into the slot of a version no answer uses any more
(``PolicyServer._load_locked``), which no forward reads.

What is the libraries' and what is written here. transformers provides the model
forward with a ``DynamicCache`` and its pluggable attention (``AttentionInterface``),
PyTorch's ``scaled_dot_product_attention`` (grouped-query heads included), the sampling
warpers (``TemperatureLogitsWarper``, ``TopPLogitsWarper``) and the incremental
detokenizer (``TextIteratorStreamer``); PEFT provides the LoRA layers. Written by hand,
because no library does it here: the scheduler loop, the packing of a step, the
row cache layer and the attention over its rows, the per-token scaling of a mixed
step (PEFT has no per-row or per-token scaling), per-row sampling with per-request
settings and generators, and a top-p that looks at the 64 most likely tokens before
sorting 49k (``top_p_filter``; the same kept set as transformers' warper, which it falls
back to). transformers' own ``ContinuousBatchingManager``
(``generate_batch``/``init_continuous_batching``) also packs requests into one ragged
row, over a paged cache, and was read and not used: it runs one adapter for the whole
batch, and its ``do_sample`` and random seed are global to the manager, not per request.

Limits: decoder models whose layers all use full attention (SmolLM2, Llama, Qwen
without sliding windows, no attention softcap or sinks); the caller checks
:func:`supports` and falls back to one answer at a time otherwise.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from transformers import (
    AttentionInterface,
    DynamicCache,
    TemperatureLogitsWarper,
    TopPLogitsWarper,
)
from transformers.cache_utils import DynamicLayer

from rlhf_core.generation import generate_kwargs

if TYPE_CHECKING:
    from transformers import TextIteratorStreamer

    from rlhf_core.serving import Generation, PolicyServer

log = logging.getLogger(__name__)


def supports(model: Any) -> bool:
    """Whether the batched loop can serve this model: every layer a plain key/value
    cache (no sliding window, no linear attention), which is what joining by
    left-padding assumes."""
    try:
        cache = DynamicCache(config=model.config)
    except Exception:  # an architecture whose config the cache cannot read
        return False
    return bool(cache.layers) and not any(cache.is_sliding) and not any(cache.is_linear)


class _RowLayer(DynamicLayer):
    """One layer of the batch's key/value cache, ``[rows, heads, width, head_dim]``: each
    answer owns a row (``Slot.row``) and its tokens fill it from column 0. ``update``
    writes the step's packed tokens into their answers' rows at their next columns
    (``_STEP.rows``/``_STEP.cols``) in place, and returns the whole buffers;
    ``_packed_attention`` reads them. ``DynamicLayer.update`` would concatenate instead,
    copying the whole cache in every layer at every step (about a tenth of a decode step
    at 8 answers here)."""

    def __init__(self, rows: int, width: int) -> None:
        super().__init__()
        self.rows, self.width = rows, width

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.device = key_states.device
            self.is_initialized = True
            # Zeros, not empty: a decode step's attention reads every row up to the longest
            # answer and masks the columns past each row's length, and a masked NaN (what
            # uninitialised memory may hold) still makes the row's softmax NaN.
            self.keys, self.values = (
                t.new_zeros((self.rows, t.shape[1], self.width, t.shape[-1]))
                for t in (key_states, value_states)
            )
        # [1, heads, tokens, dim] -> one [heads, dim] vector per (row, column) pair.
        self.keys[_STEP.rows, :, _STEP.cols] = key_states[0].transpose(0, 1)
        self.values[_STEP.rows, :, _STEP.cols] = value_states[0].transpose(0, 1)
        return self.keys, self.values

    def resize(self, rows: int, width: int) -> None:
        """Grow to ``rows`` x ``width``, keeping every row's columns where they are."""
        if self.is_initialized:
            old_rows, old_width = self.rows, self.width
            for name in ("keys", "values"):
                old = getattr(self, name)
                new = old.new_zeros((rows, old.shape[1], width, old.shape[-1]))
                new[:old_rows, :, :old_width] = old
                setattr(self, name, new)
        self.rows, self.width = rows, width

    def move_rows(self, moves: list[tuple[int, int, int]]) -> None:
        """Copy the first ``length`` columns of row ``src`` into row ``dst`` for each
        (src, dst, length)."""
        if self.is_initialized:
            for src, dst, length in moves:
                self.keys[dst, :, :length] = self.keys[src, :, :length]
                self.values[dst, :, :length] = self.values[src, :, :length]


def _row_cache(config: Any, rows: int, width: int) -> DynamicCache:
    """An empty DynamicCache over ``_RowLayer``s of ``rows`` x ``width`` columns."""
    cache = DynamicCache(config=config)
    cache.layers = [_RowLayer(rows, width) for _ in cache.layers]
    return cache


@dataclass
class _Step:
    """Where one forward's packed tokens go and what they attend to: ``rows``/``cols``
    the cache row and column of each token; ``decode`` the packed index of each decode
    token (one per answer, the answer on row i of ``decode_rows``) and ``lengths`` the
    keys of rows 0.. after this step; ``chunks`` per prompt chunk (first token in the
    packed row, its token count, its row, its answer's keys after this step)."""

    rows: torch.Tensor | None = None
    cols: torch.Tensor | None = None
    decode: torch.Tensor | None = None
    decode_rows: torch.Tensor | None = None
    lengths: torch.Tensor | None = None
    in_order: bool = False  # decode token i is packed at i and on row i, for every row
    chunks: list[tuple[int, int, int, int]] = field(default_factory=list)


# The forward in progress (the model lock is held for it, so there is one at a time).
_STEP = _Step()
PACKED_ATTENTION = "rlhf_packed"


def _packed_attention(
    module: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Attention for a packed batch, registered with transformers' AttentionInterface.
    ``query`` is ``[1, heads, tokens, dim]`` (the packed row), ``key``/``value`` the
    ``_RowLayer`` buffers. The decode tokens, one per answer, attend in ONE batched
    ``scaled_dot_product_attention`` to their rows (``[rows, heads, longest, dim]``, a
    view, each row masked past its length): one call per layer, like an unpacked batch
    (a call per answer cost about 1 ms each on the loaded 2-core CPU, where OpenMP's
    threads wait for each other). Each prompt chunk attends to its row, causally among
    its own tokens: one call per joining answer."""
    if kwargs.get("softcap") is not None or kwargs.get("s_aux") is not None:
        raise NotImplementedError("The batched server does not serve attention softcaps or sinks.")
    step = _STEP
    gqa = query.shape[1] != key.shape[1]
    output = torch.empty_like(query)
    if step.decode is not None and len(step.decode):
        rows = len(step.lengths)
        longest = int(step.lengths.max())
        if step.in_order:  # decode token i is packed at i and on row i: views, no gather
            q = query[0, :, :rows].transpose(0, 1)[:, :, None]
        else:
            q = query.new_zeros((rows, query.shape[1], 1, query.shape[-1]))
            q[step.decode_rows] = query[0, :, step.decode].transpose(0, 1)[:, :, None]
        # Rows without a decode token (a prompt still joining) attend to column 0 only
        # (a row with nothing to attend to would give NaN); their output is not used.
        lengths = step.lengths.clamp_min(1)
        mask = torch.arange(longest, device=query.device)[None, :] < lengths[:, None]
        attended = torch.nn.functional.scaled_dot_product_attention(
            q,
            key[:rows, :, :longest],
            value[:rows, :, :longest],
            attn_mask=mask[:, None, None, :],
            scale=scaling,
            enable_gqa=gqa,
        )
        if step.in_order:
            output[0, :, :rows] = attended[:, :, 0].transpose(0, 1)
        else:
            output[0, :, step.decode] = attended[step.decode_rows, :, 0].transpose(0, 1)
    for first, n, row, length in step.chunks:
        # The chunk is the last n of its row's keys: causal, aligned bottom-right.
        ends = torch.arange(length - n, length, device=query.device)
        mask = torch.arange(length, device=query.device)[None, :] <= ends[:, None]
        output[:, :, first : first + n] = torch.nn.functional.scaled_dot_product_attention(
            query[:, :, first : first + n],
            key[row : row + 1, :, :length],
            value[row : row + 1, :, :length],
            attn_mask=mask,
            scale=scaling,
            enable_gqa=gqa,
        )
    return output.transpose(1, 2).contiguous(), None


AttentionInterface.register(PACKED_ATTENTION, _packed_attention)


# One packed forward at a time in the process: the attention reads the module's _STEP, and
# the forward switches its model's attention implementation, so two batched servers stepping
# at once (two PolicyServers in one process: a benchmark's engines, the tests' servers on one
# shared model) would each read the other's step (a decode failed on "shape mismatch" and
# ended every answer in both batches).
_PACKED_LOCK = threading.Lock()


@contextlib.contextmanager
def _packed(config: Any, step: _Step) -> Iterator[None]:
    """The model's attention reads ``step`` for one forward, then is as it was."""
    global _STEP
    with _PACKED_LOCK:
        before = config._attn_implementation
        config._attn_implementation = PACKED_ATTENTION
        _STEP = step
        try:
            yield
        finally:
            _STEP = _Step()
            config._attn_implementation = before


@dataclass
class Slot:
    """One request in (or waiting for) the batch."""

    gen: Generation
    streamer: TextIteratorStreamer
    generator: torch.Generator
    warpers: list[Any]
    do_sample: bool
    stop_ids: frozenset[int]
    tokens: list[int] = field(default_factory=list)  # generated so far
    length: int = 0  # this answer's tokens in the cache (its prompt, then its answer)
    row: int = -1  # its row of the batch's key/value cache (given as it joins)
    eos: bool = False  # ended with a stop token (not cut by the limit)
    stop_token: int | None = None  # that token (not streamed)
    error: BaseException | None = None
    done: bool = False
    released: bool = False  # pin released and stream ended (exactly once)
    joined_at: float | None = None

    @property
    def prefilled(self) -> bool:
        """Whether the whole prompt is in the cache (then it feeds its last token)."""
        return self.length >= len(self.gen.prompt.input_ids)

    @property
    def room(self) -> int:
        """Cache columns it can need: its prompt and all but the last of its tokens."""
        return len(self.gen.prompt.input_ids) + self.gen.sampling.max_new_tokens

    @property
    def key(self) -> tuple:
        """Rows with equal keys are warped as one batch."""
        return (self.do_sample, *((type(w).__name__, *vars(w).values()) for w in self.warpers))

    @property
    def cancelled(self) -> bool:
        return self.gen._cancel.is_set()


class ContinuousBatcher:
    """The decode loop of one :class:`PolicyServer` (started at the first request)."""

    # Off: every forward on a PEFT model scales each adapter per token, also when all the
    # answers are on one version (tests compare the paths' tokens).
    single_version_fast_path = True
    # Off: a step with answers on several versions runs one forward per version instead
    # of scaling each adapter per token (tests compare the two).
    row_scaled_mixing = True
    # Prompt tokens prefilled per step, over all the answers joining. A longer prompt is
    # prefilled over several steps, each of which also gives every running answer its
    # next token, so a long prompt delays the others by a chunk at a time, not by its
    # whole prefill. 256: a whole prompt of a typical chat in one step; larger chunks
    # only lengthen the others' wait.
    prefill_chunk = 256

    def __init__(self, server: PolicyServer, max_batch_size: int) -> None:
        self.server = server
        self.max_batch_size = max(1, int(max_batch_size))
        self._waiting: deque[Slot] = deque()
        self._active: list[Slot] = []
        # The batch's key/value cache, a row per answer: ``_active[i]`` is on row i.
        self._cache: DynamicCache | None = None
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stop = False
        self.steps = 0  # steps run, one forward each but per version (tests, benchmarks)
        self.forwards = 0  # model forwards run (tests read it)
        self.mixed_forwards = 0  # forwards with rows on different versions (tests read it)
        self.max_seen_batch = 0
        self._layers_key: tuple | None = None
        self._layers: list[Any] | None = None

    # --- requests ----------------------------------------------------------------
    def submit(self, slot: Slot) -> None:
        with self._wake:
            if self._thread is None or not self._thread.is_alive():
                self._stop = False
                self._thread = threading.Thread(target=self._loop, name="policy-batch", daemon=True)
                self._thread.start()
            self._waiting.append(slot)
            self._wake.notify_all()

    def poke(self) -> None:
        """Wake the loop (a request was cancelled while it slept)."""
        with self._wake:
            self._wake.notify_all()

    def stop(self) -> None:
        with self._wake:
            self._stop = True
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)

    @property
    def active(self) -> int:
        return len(self._active)

    # --- the loop ------------------------------------------------------------------
    def _loop(self) -> None:
        server = self.server
        while True:
            with self._wake:
                self._wake.wait_for(lambda: self._stop or self._waiting or self._active)
                if self._stop:
                    break
            # A pending adapter load goes first; it then waits for at most one step.
            with server._turn:
                server._turn.wait_for(lambda: not server._swaps_waiting)
            with server._generate_lock:
                try:
                    self._step()
                except BaseException as error:  # the requests in flight get the error
                    log.exception("batched decode step failed")
                    self._fail_all(error)
        self._fail_all(RuntimeError("The policy server stopped."))

    def _step(self) -> None:
        self._drop(lambda s: s.cancelled)
        joining = []
        with self._wake:
            while self._waiting and len(self._active) + len(joining) < self.max_batch_size:
                slot = self._waiting.popleft()
                if slot.cancelled:
                    self._finish(slot)
                else:
                    joining.append(slot)
        try:
            for slot in joining:
                self.server._repin_to_current(slot.gen)  # it takes the version current now
                slot.joined_at = time.perf_counter()
            if joining:
                self._place(joining)
        except BaseException as error:
            # Neither waiting nor active: _fail_all would not see them, and their readers
            # would wait for the stream's timeout with their versions pinned.
            for slot in joining:
                slot.error = error
                self._finish(slot)
            raise
        self._active += joining
        if self._active:
            self._forward(self._feeds())
            self.steps += 1
        self._drop(lambda s: s.done)
        self.max_seen_batch = max(self.max_seen_batch, len(self._active))

    @torch.inference_mode()  # the cache's tensors are inference tensors
    def _place(self, joining: list[Slot]) -> None:
        """Give each joining answer the next row of the cache (rows 0.. hold the running
        answers), with room for its prompt and its longest answer; the cache grows
        (rows doubling, up to the batch limit) when it has too few rows or too short ones."""
        rows = len(self._active) + len(joining)
        width = max(s.room for s in [*self._active, *joining])
        if self._cache is None:
            self._cache = _row_cache(self._model().config, rows, width)
        have = self._cache.layers[0]
        if rows > have.rows or width > have.width:
            rows = max(rows, have.rows, min(2 * have.rows, self.max_batch_size))
            width = max(width, have.width)
            for layer in self._cache.layers:
                layer.resize(rows, width)
        for i, slot in enumerate(joining):
            slot.row = len(self._active) + i

    def _feeds(self) -> list[tuple[Slot, list[int]]]:
        """What each answer feeds the model in this step: a running answer its last
        token, a joining one the next chunk of its prompt (``prefill_chunk`` tokens per
        step in all, in the order they joined; a prompt left without a share waits)."""
        feeds = []
        budget = self.prefill_chunk
        for slot in self._active:
            if slot.prefilled:
                feeds.append((slot, slot.tokens[-1:]))
            elif budget > 0:
                chunk = slot.gen.prompt.input_ids[slot.length : slot.length + budget]
                budget -= len(chunk)
                feeds.append((slot, chunk))
        return feeds

    def _model(self) -> Any:
        return self.server.model

    def _forward(self, feeds: list[tuple[Slot, list[int]]]) -> None:
        """One step: every answer's tokens in one forward, or one forward per version
        where the model's LoRA layers cannot be scaled per token (LoRA variants)."""
        versions = {slot.gen.version for slot, _ in feeds}
        if len(versions) > 1 and self.server._peft and not self._mixes_by_scaling(feeds):
            for version in sorted(versions):
                self._forward_packed([f for f in feeds if f[0].gen.version == version])
            return
        self._forward_packed(feeds)

    def _names(self, slots: list[Slot]) -> list[str | None]:
        """Each slot's adapter (None: the base model)."""
        from rlhf_core.serving import BASE_VERSION

        return [
            None if s.gen.version == BASE_VERSION else self.server.adapter_for(s.gen.version)
            for s in slots
        ]

    def _mixes_by_scaling(self, feeds: list[tuple[Slot, list[int]]]) -> bool:
        if not self.row_scaled_mixing:
            return False
        names = {n for n in self._names([slot for slot, _ in feeds]) if n is not None}
        return self._scalable_layers(self.server.model, names) is not None

    @torch.inference_mode()
    def _forward_packed(self, feeds: list[tuple[Slot, list[int]]]) -> None:
        """Run ``feeds`` as one packed row: every answer's tokens in one sequence, each
        attending to its own answer only (``_packed_attention``); then sample for each
        answer whose whole prompt is now in the cache."""
        device = self.server.loaded.model.device
        step = _Step()
        ids, positions, rows, names, ends, sampled = [], [], [], [], [], []
        decode, decode_rows = [], []
        for (slot, tokens), name in zip(feeds, self._names([f[0] for f in feeds]), strict=True):
            n = len(tokens)
            if slot.prefilled:  # its last generated token
                decode.append(len(ids))
                decode_rows.append(slot.row)
            else:
                step.chunks.append((len(ids), n, slot.row, slot.length + n))
            ids += tokens
            positions += range(slot.length, slot.length + n)
            rows += [slot.row] * n
            names += [name] * n
            slot.length += n
            if slot.prefilled:  # its last token's logits give its next token
                ends.append(len(ids) - 1)
                sampled.append(slot)
        step.rows = torch.tensor(rows, device=device)
        step.cols = torch.tensor(positions, device=device)
        if decode:
            step.decode = torch.tensor(decode, device=device)
            step.decode_rows = torch.tensor(decode_rows, device=device)
            lengths = [0] * (max(decode_rows) + 1)
            for slot in self._active:
                if slot.row < len(lengths):
                    lengths[slot.row] = slot.length if slot.row in decode_rows else 0
            step.lengths = torch.tensor(lengths, device=device)
            order = list(range(len(decode)))
            step.in_order = decode == order and decode_rows == order and len(lengths) == len(order)
        keep = torch.tensor(ends, device=device) if ends else 1
        with self._versions(names), _packed(self.server.loaded.model.config, step):
            out = self._model()(
                input_ids=torch.tensor([ids], device=device),
                position_ids=torch.tensor([positions], device=device),
                cache=self._cache,
                use_cache=True,
                logits_to_keep=keep,
            )
        self.forwards += 1
        if sampled:
            self._emit(sampled, out.logits[0])

    @contextlib.contextmanager
    def _versions(self, names: list[str | None]) -> Iterator[None]:
        """Set the model up for one forward whose tokens are on adapters ``names`` (one
        per token, None = the base model).

        Tokens all on one version (every step outside a swap) run that version plainly,
        as the one-at-a-time server does. Tokens on several versions (every step while
        answers started before a swap are still running: with a publish every few
        seconds, most steps) are scaled per token (:func:`_row_scaled`); ``_forward``
        runs one forward per version instead where the LoRA layers do not allow it. Same
        arithmetic, the same tokens (test_serving checks all three)."""
        if not self.server._peft:
            yield
            return
        model = self.server.model
        if len(set(names)) > 1 or not self.single_version_fast_path:
            layers = self._scalable_layers(model, {n for n in names if n is not None})
            if layers is not None:
                self.mixed_forwards += 1
                with _row_scaled(layers, names):
                    yield
                return
        (name,) = set(names)
        if name is None:
            with model.disable_adapter():
                yield
            return
        if model.active_adapter != name:
            model.set_adapter(name)
        yield

    def _scalable_layers(self, model: Any, names: set[str]) -> list[Any] | None:
        """:func:`_scalable_lora_layers`, cached until the model's adapters change (a walk
        of the module tree costs several milliseconds, a fair part of a decode step)."""
        key = (id(model), tuple(model.peft_config), frozenset(names))
        if self._layers_key != key:
            self._layers_key, self._layers = key, _scalable_lora_layers(model, names)
        return self._layers

    def _emit(self, slots: list[Slot], logits: torch.Tensor) -> None:
        """Sample one token per row for ``slots``, stream it, mark the ones done."""
        for slot, token in zip(slots, self._sample(slots, logits.float()), strict=True):
            if token in slot.stop_ids:
                slot.eos = True
                slot.done = True
                slot.stop_token = token
                continue
            slot.tokens.append(token)
            slot.streamer.put(torch.tensor([token]))
            if len(slot.tokens) >= slot.gen.sampling.max_new_tokens:
                slot.done = True

    @staticmethod
    def _sample(slots: list[Slot], scores: torch.Tensor) -> list[int]:
        """Rows with the same settings are warped together (one sort for top-p, one
        softmax); each row then draws from its own generator, so a request's tokens do
        not depend on what else is in the batch."""
        picks: list[int] = [0] * len(slots)
        groups: dict[tuple, list[int]] = {}
        for row, slot in enumerate(slots):
            groups.setdefault(slot.key, []).append(row)
        for rows in groups.values():
            first = slots[rows[0]]
            sub = scores[rows]
            if not first.do_sample:
                for row, token in zip(rows, sub.argmax(-1).tolist(), strict=True):
                    picks[row] = int(token)
                continue
            for warper in first.warpers:  # temperature and top-p read no token history
                if isinstance(warper, TopPLogitsWarper):
                    sub = top_p_filter(sub, warper.top_p)
                else:
                    sub = warper(None, sub)
            # Inverse-CDF draw: one uniform number per row from the row's generator
            # (torch.multinomial took 24 ms a row over the 49k-token vocabulary here),
            # then one searchsorted for the group.
            cdf = torch.softmax(sub, dim=-1).cumsum(dim=-1)
            # Drawn on the CPU (each request's generator is a CPU one, so a seed gives the
            # same answer on any device), then moved to the logits' device.
            u = torch.cat([torch.rand(1, generator=slots[row].generator) for row in rows])
            u = u.to(cdf.device)
            u = (u[:, None] * cdf[:, -1:]).clamp_min(torch.finfo(cdf.dtype).tiny)  # u = 0 would
            drawn = torch.searchsorted(cdf, u).clamp_max(cdf.shape[-1] - 1)  # pick a p = 0 token
            for row, token in zip(rows, drawn[:, 0].tolist(), strict=True):
                picks[row] = int(token)
        return picks

    @torch.inference_mode()  # the cache's tensors are inference tensors
    def _drop(self, gone) -> None:
        """Remove the answers for which ``gone(slot)`` is true, then end their streams (a
        reader that sees its stream end sees the batch without it). The answers on the
        last rows move into the rows freed (a copy of their filled columns), so the
        running answers keep rows 0.. and a decode step reads no free row."""
        leaving = [s for s in self._active if gone(s)]
        if not leaving:
            return
        staying = [s for s in self._active if not gone(s)]
        if not staying:
            self._clear()
        else:
            free = sorted(s.row for s in leaving if s.row < len(staying))
            movers = [s for s in staying if s.row >= len(staying)]
            moves = []
            for slot, row in zip(movers, free, strict=True):
                moves.append((slot.row, row, slot.length))
                slot.row = row
            for layer in self._cache.layers:
                layer.move_rows(moves)
            self._active = sorted(staying, key=lambda s: s.row)
        for slot in leaving:
            self._finish(slot)

    def _clear(self) -> None:
        self._active, self._cache = [], None

    def _finish(self, slot: Slot) -> None:
        slot.done = True
        if slot.released:
            return
        slot.released = True
        self.server._release(slot.gen.version)
        slot.streamer.end()

    def _fail_all(self, error: BaseException) -> None:
        with self._wake:
            waiting = list(self._waiting)
            self._waiting.clear()
        for slot in [*self._active, *waiting]:
            slot.error = error
            self._finish(slot)
        self._clear()


def _scalable_lora_layers(model: Any, names: set[str]) -> list[Any] | None:
    """The model's LoRA layers when :func:`_row_scaled` computes each token on its own
    adapter of ``names``: plain LoRA on ``nn.Linear`` layers
    (``result + lora_B(lora_A(x)) * scaling``), no variant (DoRA...), nothing merged.
    None otherwise (the caller then runs one forward per version)."""
    from peft.tuners.lora import Linear as LoraLinear
    from peft.tuners.lora import LoraLayer

    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    for layer in layers:
        if type(layer) is not LoraLinear or layer.merged or layer.disable_adapters:
            return None
        if any(name in layer.lora_variant for name in names):
            return None
    return layers


@contextlib.contextmanager
def _row_scaled(layers: list[Any], names: list[str | None]) -> Iterator[None]:
    """Run one forward over a packed row with each token on its own adapter
    (``names[token]``, None = none) by making every adapter in the batch active with a
    per-token scaling: the adapter's ``scaling`` where the token is on it, 0 where not.

    PEFT's plain LoRA forward adds ``lora_B(lora_A(x)) * scaling`` for each active
    adapter; with ``scaling`` a ``[1, tokens, 1]`` tensor every token gets exactly its
    own adapter's delta (the others add +-0.0, which leaves a float unchanged), so each
    token's logits are those of its adapter alone (test_serving compares the tokens).
    Why not PEFT's per-request ``adapter_names``: it selects adapters per batch row, and
    here the whole batch is one packed row; before the batch was packed it was also about
    30% slower than a one-version step on SmolLM2 at 8 rows (a hook registered on each of
    the 120 LoRA layers at every forward, and in each layer a gather and scatter of each
    adapter's rows). Here the extra work is one rank-r product per adapter per layer.

    This sets ``_active_adapter`` and ``scaling`` on the layers directly (what PEFT's
    ``set_adapter`` would do, without walking the model to toggle ``requires_grad`` and
    without a per-token scaling, which PEFT has no API for) and restores both after; the
    model lock is held, so no other forward sees them."""
    unique = sorted({n for n in names if n is not None})
    device = layers[0].lora_A[unique[0]].weight.device if unique else None
    rows = {
        n: torch.tensor([1.0 if m == n else 0.0 for m in names], device=device).view(1, -1, 1)
        for n in unique
    }
    scaled: dict[tuple[str, float, torch.dtype], torch.Tensor] = {}
    saved = []
    try:
        for layer in layers:
            present = [n for n in unique if n in layer.scaling]
            saved.append((layer, layer._active_adapter, {n: layer.scaling[n] for n in present}))
            for n in present:
                key = (n, float(layer.scaling[n]), layer.lora_A[n].weight.dtype)
                if key not in scaled:
                    scaled[key] = (rows[n] * key[1]).to(key[2])
                layer.scaling[n] = scaled[key]
            layer._active_adapter = present
        yield
    finally:
        for layer, active, scales in saved:
            layer._active_adapter = active
            layer.scaling.update(scales)


TOP_P_CANDIDATES = 64  # tokens looked at before falling back to a full sort


def top_p_filter(scores: torch.Tensor, top_p: float) -> torch.Tensor:
    """What ``TopPLogitsWarper(top_p)(None, scores)`` returns, for rows ``[batch, vocab]``,
    without sorting the whole vocabulary: a token is kept when the tokens more likely than
    it hold less than ``top_p`` of the mass (the most likely token always). The warper
    sorts all 49k tokens of every row at every step, which took about as long as the
    model's output layer at 8 rows here; the nucleus at the served temperatures is a few
    tokens, so the ``TOP_P_CANDIDATES`` most likely ones decide it whenever they hold
    ``top_p`` of the mass. Rows where they do not (a flat distribution) go through the
    warper itself. The kept sets equal the warper's up to float rounding at the exact
    boundary (sums taken in another order); test_serving compares them row by row.
    ``top_p >= 1`` returns ``scores`` unchanged (the warper would still cut the tokens whose
    probability underflows to 0; make_slot adds no top-p warper then)."""
    if top_p >= 1.0:
        return scores
    probs = scores.softmax(dim=-1)
    top, index = probs.topk(min(TOP_P_CANDIDATES, probs.shape[-1]), dim=-1)  # descending
    mass = top.cumsum(dim=-1)
    before = torch.cat([top.new_zeros(top.shape[0], 1), mass[:, :-1]], dim=-1)
    keep_top = before < top_p
    keep_top[:, 0] = True
    keep = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, index, keep_top)
    out = scores.masked_fill(~keep, -float("inf"))
    # Decided within the candidates when they hold top_p: the next token has >= top_p before it.
    undecided = (mass[:, -1] < top_p).nonzero()[:, 0]
    if len(undecided):
        out[undecided] = TopPLogitsWarper(top_p)(None, scores[undecided])
    return out


def make_slot(
    gen: Generation, streamer: TextIteratorStreamer, stop_ids: list[int], seed: int | None
) -> Slot:
    """A request's slot, sampling as ``generate`` would with the arguments that
    rlhf_core.generation builds for it (the one builder serving, rollouts and the gate
    share): greedy when it says ``do_sample=False``, otherwise its temperature and then
    top-p warper (the order of transformers' ``_get_logits_processor``); every other
    argument it pins to the neutral value, so no other processor applies. Each request
    has its own random generator: ``seed`` makes its answer reproducible whatever
    else is in the batch."""
    kwargs = generate_kwargs(gen.sampling, eos_token_id=stop_ids, pad_token_id=None)
    generator = torch.Generator()
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(int(seed))
    warpers: list[Any] = []
    if kwargs["do_sample"]:
        if kwargs["temperature"] not in (None, 1.0):
            warpers.append(TemperatureLogitsWarper(float(kwargs["temperature"])))
        if kwargs["top_p"] is not None and kwargs["top_p"] < 1.0:
            warpers.append(TopPLogitsWarper(float(kwargs["top_p"])))
    return Slot(
        gen=gen,
        streamer=streamer,
        generator=generator,
        warpers=warpers,
        do_sample=bool(kwargs["do_sample"]),
        stop_ids=frozenset(stop_ids),
    )
