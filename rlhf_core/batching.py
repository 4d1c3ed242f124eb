"""Continuous batching for :class:`~rlhf_core.serving.PolicyServer`: one decode loop,
requests join and leave it at token boundaries.

One thread owns the model and runs a loop of steps. Each step:

1. drops the requests whose reader went away (a closed tab, Undo) and the ones done;
2. admits waiting requests: their prompts are prefilled together (left-padded, one
   forward), each samples its first token, and their key/value cache is padded on the
   left and concatenated to the running batch's cache;
3. runs one decode forward for every request in the batch (one new token each), and
   samples each row with that request's own settings and random generator.

A new chat therefore waits at most one step (plus its own prefill), never for the
longest answer in the batch, and every answer streams its own tokens through its own
``TextIteratorStreamer``.

Versions in one batch, not grouped per version: every LoRA layer runs the base weights
once for the whole batch and adds each adapter's low-rank delta to its rows only.
Grouping the batch by version and running one forward per version would multiply the
base model's cost by the number of versions in flight -- two or three during every swap,
exactly when a new version should reach people quickly. An answer keeps the version it
joined with (its pin also keeps the adapter loaded) even when another becomes current.
A step whose rows are all on one version (every step outside a swap) runs that version
plainly, as the one-at-a-time server does. A step with several versions (nearly every
step while versions are published every few seconds: the answers started before a
publish are still running) makes every adapter of the batch active with a per-row
scaling, the adapter's own where the row is on it and 0 elsewhere (:func:`_row_scaled`);
PEFT's per-request ``adapter_names`` computes the same logits but registers a hook per
LoRA layer at each forward and gathers/scatters each adapter's rows in every layer,
which made a mixed step about 30% slower than a one-version step on SmolLM2 at 8 rows.
``adapter_names`` stays the path for layers the scaling does not cover (LoRA variants
such as DoRA, non-Linear LoRA layers).

Swaps: the loop holds the server's model lock for one step at a time, and yields
to a waiting adapter edit before taking it again, so building a new adapter slot beside
the running batch waits for at most one step. Most versions need no lock at all: their
weights are copied into the slot of a version no answer uses any more
(``PolicyServer._load_locked``), which no forward reads.

What is the libraries' and what is written here. transformers provides the model
forward with a ``DynamicCache`` (whose layers' ``batch_select_indices`` drops finished
rows), the sampling warpers (``TemperatureLogitsWarper``, ``TopPLogitsWarper``) and the
incremental detokenizer (``TextIteratorStreamer``); PEFT provides the LoRA layers and
mixed-adapter batches (``adapter_names``). Written by hand, because no library does it:
the per-row scaling of a mixed step (PEFT has no per-row scaling), the scheduler loop itself,
padding a prefilled cache on the left to join a running batch (DynamicCache has no
concatenate), a cache layer with spare columns (``DynamicLayer`` copies the whole
cache at every step), trimming the columns that only padding still uses, per-row
sampling with per-request settings and generators, and a top-p that looks at the 64
most likely tokens before sorting 49k (``top_p_filter``; the same kept set as
transformers' warper, which it falls back to). transformers' own
``ContinuousBatchingManager`` (``generate_batch``/``init_continuous_batching``) was
read and not used: it packs all requests into one ragged row for paged attention,
so PEFT's per-row ``adapter_names`` cannot apply (one adapter for the whole batch),
and its ``do_sample`` and random seed are global to the manager, not per request.

Limits: decoder models whose layers all use full attention (SmolLM2, Llama, Qwen
without sliding windows); the caller checks :func:`supports` and falls back to one
answer at a time otherwise. A long prompt's prefill runs inside one step, so it
delays the batch's next token by that prefill's time.
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
from transformers import DynamicCache, TemperatureLogitsWarper, TopPLogitsWarper
from transformers.cache_utils import DynamicLayer

from rlhf_core.generation import generate_kwargs

if TYPE_CHECKING:
    from transformers import TextIteratorStreamer

    from rlhf_core.serving import Generation, PolicyServer

log = logging.getLogger(__name__)

BASE_ADAPTER = "__base__"  # PEFT's name for "no adapter" in a mixed batch


def supports(model: Any) -> bool:
    """Whether the batched loop can serve this model: every layer a plain key/value
    cache (no sliding window, no linear attention), which is what joining by
    left-padding assumes."""
    try:
        cache = DynamicCache(config=model.config)
    except Exception:  # an architecture whose config the cache cannot read
        return False
    return bool(cache.layers) and not any(cache.is_sliding) and not any(cache.is_linear)


class _ReservedLayer(DynamicLayer):
    """A ``DynamicLayer`` with spare columns on the right of its key/value tensors, so a
    decode step writes its one column in place. ``DynamicLayer.update`` concatenates,
    which copies the whole batch's cache in every layer at every step (at 8 rows here
    about a tenth of a decode step, and it grows with the batch and the answer).
    ``keys``/``values`` are views of the filled columns, so everything that reads a
    DynamicLayer (masks, attention, ``get_seq_length``) reads this one the same way."""

    SPARE = 64  # columns reserved at a time: one reallocation per 64 steps

    def __init__(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        super().__init__()
        self.device = keys.device
        self.is_initialized = True
        self._reserve(keys, values, self.SPARE)

    def _reserve(self, keys: torch.Tensor, values: torch.Tensor, spare: int) -> None:
        filled = keys.shape[-2]
        buffers = []
        for tensor in (keys, values):
            shape = list(tensor.shape)
            shape[-2] = filled + spare
            buffer = tensor.new_empty(shape)
            buffer[..., :filled, :].copy_(tensor)
            buffers.append(buffer)
        self._keys, self._values = buffers
        self._expose(filled)

    def _expose(self, filled: int) -> None:
        self.keys = self._keys[..., :filled, :]
        self.values = self._values[..., :filled, :]

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        filled, new = self.keys.shape[-2], key_states.shape[-2]
        if filled + new > self._keys.shape[-2]:
            self._reserve(self.keys, self.values, max(self.SPARE, new))
        self._keys[..., filled : filled + new, :] = key_states
        self._values[..., filled : filled + new, :] = value_states
        self._expose(filled + new)
        return self.keys, self.values

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        filled = self.keys.shape[-2]
        self._keys, self._values = self._keys[indices], self._values[indices]
        self._expose(filled)

    def drop_left(self, columns: int) -> None:
        """Forget the first ``columns`` columns (padding for every row now); a view, no copy."""
        filled = self.keys.shape[-2]
        self._keys = self._keys[..., columns:, :]
        self._values = self._values[..., columns:, :]
        self._expose(filled - columns)


def _reserved_cache(pairs: list[tuple[torch.Tensor, torch.Tensor]], config: Any) -> DynamicCache:
    """A DynamicCache over ``_ReservedLayer``s holding ``pairs`` (keys, values per layer)."""
    cache = DynamicCache(config=config)
    cache.layers = [_ReservedLayer(keys, values) for keys, values in pairs]
    return cache


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
    length: int = 0  # real (unpadded) tokens in the cache for this row
    eos: bool = False  # ended with a stop token (not cut by the limit)
    stop_token: int | None = None  # that token (not streamed)
    error: BaseException | None = None
    done: bool = False
    released: bool = False  # pin released and stream ended (exactly once)
    joined_at: float | None = None

    @property
    def key(self) -> tuple:
        """Rows with equal keys are warped as one batch."""
        return (self.do_sample, *((type(w).__name__, *vars(w).values()) for w in self.warpers))

    @property
    def cancelled(self) -> bool:
        return self.gen._cancel.is_set()


class ContinuousBatcher:
    """The decode loop of one :class:`PolicyServer` (started at the first request)."""

    # Off: every forward on a PEFT model takes the per-row adapter_names path (tests
    # compare the paths' tokens).
    single_version_fast_path = True
    # Off: steps with rows on several versions take PEFT's adapter_names path instead of
    # scaling each adapter per row (tests compare the two).
    row_scaled_mixing = True

    def __init__(self, server: PolicyServer, max_batch_size: int) -> None:
        self.server = server
        self.max_batch_size = max(1, int(max_batch_size))
        self._waiting: deque[Slot] = deque()
        self._active: list[Slot] = []
        self._cache: DynamicCache | None = None
        self._mask: torch.Tensor | None = None  # [batch, columns] 1 = real token
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stop = False
        self.steps = 0  # decode steps run (tests and benchmarks read it)
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
        if joining:
            self._join(joining)
        if self._active:
            self._decode()
        self._drop(lambda s: s.done)
        self.max_seen_batch = max(self.max_seen_batch, len(self._active))

    def _model(self) -> Any:
        return self.server.model

    @contextlib.contextmanager
    def _versions(self, slots: list[Slot]) -> Iterator[dict[str, Any]]:
        """Set the model up for one forward over ``slots``; yields its extra arguments.

        When every row is on one version (every step outside a swap) the model runs that
        version plainly, as the one-at-a-time server does. Rows on different versions
        (every step while answers started before a swap are still running: with a publish
        every few seconds, most steps) are scaled per row (:func:`_row_scaled`) where every
        LoRA layer allows it, else they take PEFT's per-row ``adapter_names``. Same
        arithmetic, the same tokens (test_serving checks all three)."""
        if not self.server._peft:
            yield {}
            return
        from rlhf_core.serving import BASE_VERSION

        model = self.server.model
        versions = {s.gen.version for s in slots}
        names = [
            None if s.gen.version == BASE_VERSION else self.server.adapter_for(s.gen.version)
            for s in slots
        ]
        if len(versions) > 1 or not self.single_version_fast_path:
            self.mixed_forwards += 1
            layers = self._scalable_layers(model, {n for n in names if n is not None})
            if self.single_version_fast_path and self.row_scaled_mixing and layers is not None:
                with _row_scaled(layers, names):
                    yield {}
                return
            yield {"adapter_names": [BASE_ADAPTER if n is None else n for n in names]}
            return
        (name,) = set(names)
        if name is None:
            with model.disable_adapter():
                yield {}
            return
        if model.active_adapter != name:
            model.set_adapter(name)
        yield {}

    def _scalable_layers(self, model: Any, names: set[str]) -> list[Any] | None:
        """:func:`_scalable_lora_layers`, cached until the model's adapters change (a walk
        of the module tree costs several milliseconds, a fair part of a decode step)."""
        key = (id(model), tuple(model.peft_config), frozenset(names))
        if self._layers_key != key:
            self._layers_key, self._layers = key, _scalable_lora_layers(model, names)
        return self._layers

    @torch.inference_mode()
    def _join(self, slots: list[Slot]) -> None:
        """Prefill the new requests together and add them to the running batch."""
        for slot in slots:
            self.server._repin_to_current(slot.gen)  # a request takes the version current now
            slot.joined_at = time.perf_counter()
        device = self.server.loaded.model.device
        width = max(len(s.gen.prompt.input_ids) for s in slots)
        pad = self.server.tokenizer.pad_token_id or 0
        ids = torch.full((len(slots), width), pad, dtype=torch.long, device=device)
        mask = torch.zeros((len(slots), width), dtype=torch.long, device=device)
        for row, slot in enumerate(slots):
            prompt = slot.gen.prompt.input_ids
            ids[row, width - len(prompt) :] = torch.tensor(prompt, device=device)
            mask[row, width - len(prompt) :] = 1
            slot.length = len(prompt)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache(config=self._model().config)
        with self._versions(slots) as extra:
            out = self._model()(
                input_ids=ids,
                attention_mask=mask,
                position_ids=positions,
                cache=cache,
                use_cache=True,
                logits_to_keep=1,
                **extra,
            )
        self._emit(slots, out.logits[:, -1, :])
        self._merge(slots, out.cache, mask)

    @torch.inference_mode()
    def _decode(self) -> None:
        slots = self._active
        device = self._mask.device
        last = torch.tensor([[s.tokens[-1]] for s in slots], dtype=torch.long, device=device)
        positions = torch.tensor([[s.length] for s in slots], dtype=torch.long, device=device)
        self._mask = torch.cat([self._mask, torch.ones_like(last)], dim=1)
        with self._versions(slots) as extra:
            out = self._model()(
                input_ids=last,
                attention_mask=self._mask,
                position_ids=positions,
                cache=self._cache,
                use_cache=True,
                logits_to_keep=1,
                **extra,
            )
        self._cache = out.cache
        for slot in slots:
            slot.length += 1
        self.steps += 1
        self._emit(slots, out.logits[:, -1, :])

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
            u = torch.cat([torch.rand(1, generator=slots[row].generator) for row in rows])
            u = (u[:, None] * cdf[:, -1:]).clamp_min(torch.finfo(cdf.dtype).tiny)  # u = 0 would
            drawn = torch.searchsorted(cdf, u).clamp_max(cdf.shape[-1] - 1)  # pick a p = 0 token
            for row, token in zip(rows, drawn[:, 0].tolist(), strict=True):
                picks[row] = int(token)
        return picks

    def _merge(self, slots: list[Slot], cache: DynamicCache, mask: torch.Tensor) -> None:
        """Append prefilled rows to the running batch, left-padding the shorter side so
        every row's latest token sits in the last column."""
        keep = [not s.done for s in slots]
        if not any(keep):
            for slot in slots:
                self._finish(slot)
            return
        if not all(keep):  # answered in one token: they never join
            rows = torch.tensor([i for i, k in enumerate(keep) if k], device=mask.device)
            cache.batch_select_indices(rows)
            mask = mask[rows]
            for slot, k in zip(slots, keep, strict=True):
                if not k:
                    self._finish(slot)
            slots = [s for s, k in zip(slots, keep, strict=True) if k]
        if self._cache is None:
            pairs = [(layer.keys, layer.values) for layer in cache.layers]
            self._cache, self._mask = _reserved_cache(pairs, self._model().config), mask
            self._active = list(slots)
            return
        width = max(self._mask.shape[1], mask.shape[1])
        merged = []
        for old, new in zip(self._cache.layers, cache.layers, strict=True):
            keys = torch.cat([_left_pad(old.keys, width), _left_pad(new.keys, width)], dim=0)
            values = torch.cat([_left_pad(old.values, width), _left_pad(new.values, width)])
            merged.append((keys, values))
        self._cache = _reserved_cache(merged, self._model().config)
        self._mask = torch.cat([_left_pad(self._mask, width), _left_pad(mask, width)], dim=0)
        self._active += slots

    def _drop(self, gone) -> None:
        """Remove rows for which ``gone(slot)`` is true, then end their streams (a
        reader that sees its stream end sees the batch without it)."""
        leaving = [s for s in self._active if gone(s)]
        if not leaving:
            return
        staying = [i for i, s in enumerate(self._active) if not gone(s)]
        if not staying:
            self._active, self._cache, self._mask = [], None, None
        else:
            rows = torch.tensor(staying, device=self._mask.device)
            self._cache.batch_select_indices(rows)
            self._mask = self._mask[rows]
            self._active = [self._active[i] for i in staying]
            # Columns that only the departed rows used are padding for everyone now.
            used = self._mask.any(dim=0).nonzero()
            first = int(used[0]) if len(used) else 0
            if first:
                self._mask = self._mask[:, first:]
                for layer in self._cache.layers:
                    layer.drop_left(first)
        for slot in leaving:
            self._finish(slot)

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
        self._active, self._cache, self._mask = [], None, None


def _scalable_lora_layers(model: Any, names: set[str]) -> list[Any] | None:
    """The model's LoRA layers when :func:`_row_scaled` computes what PEFT's
    ``adapter_names`` does for adapters ``names``: plain LoRA on ``nn.Linear`` layers
    (``result + lora_B(lora_A(x)) * scaling``), no variant (DoRA...), nothing merged.
    None otherwise (the caller then takes ``adapter_names``)."""
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
    """Run one forward with each row on its own adapter (``names[row]``, None = none) by
    making every adapter in the batch active with a per-row scaling: the adapter's
    ``scaling`` where the row is on it, 0 where it is not.

    PEFT's plain LoRA forward adds ``lora_B(lora_A(x)) * scaling`` for each active
    adapter; with ``scaling`` a ``[batch, 1, 1]`` tensor every row gets exactly its own
    adapter's delta (the others add +-0.0, which leaves a float unchanged), so the
    logits equal ``adapter_names``' bit for bit (test_serving compares the tokens).
    Why not ``adapter_names``: it registers and removes a hook on each of the 120 LoRA
    layers at every forward, walking the whole module tree to do so, and in each layer
    gathers the rows of every adapter from a Python index list and scatters the
    result back; on SmolLM2 with 8 rows that made a decode step about 30% slower than a
    one-version step, and during swaps nearly every step has two versions. Here the
    extra work is one rank-r product per adapter per layer over all rows.

    This sets ``_active_adapter`` and ``scaling`` on the layers directly (what PEFT's
    ``set_adapter`` would do, without walking the model to toggle ``requires_grad`` and
    without a per-row scaling, which PEFT has no API for) and restores both after; the
    model lock is held, so no other forward sees them."""
    unique = sorted({n for n in names if n is not None})
    device = layers[0].lora_A[unique[0]].weight.device if unique else None
    rows = {
        n: torch.tensor([1.0 if m == n else 0.0 for m in names], device=device).view(-1, 1, 1)
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


def _left_pad(tensor: torch.Tensor, width: int) -> torch.Tensor:
    """Pad the sequence axis (-2 for cache tensors [batch, heads, seq, dim], -1 for a
    mask [batch, seq]) with zeros on the left up to ``width``."""
    axis = -1 if tensor.dim() == 2 else -2
    missing = width - tensor.shape[axis]
    if missing <= 0:
        return tensor
    shape = list(tensor.shape)
    shape[axis] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=axis)


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
