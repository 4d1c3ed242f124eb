"""Where a hot swap's time goes: benchmarks/hot_swap.py's run, instrumented.

The same setup as hot_swap.py (embedded Valkey, the Gradio app with its VersionWatcher,
``gradio_client`` chats, a publish every ``--interval`` s), with timestamps taken inside
the server (wrapped methods, nothing changed in the code under test):

- per publish: pub/sub -> the watcher's sync starts -> adapter unpacked (materialize) ->
  verified -> model lock acquired -> PEFT load done -> current (ready); then the first
  answer that joins the batch on that version, its first token out of the decode loop,
  and its first streamed update at the client;
- steps: time per decode step by batch size, one-version vs mixed-version steps, the
  time of steps that carry a joining prompt (packed with the running answers' decode),
  the time the loop waited for the model lock while an adapter loaded;
- every request: client submit -> slot submitted to the batcher (Gradio queue and
  handler) -> joined -> first token -> first update at the client.

    python benchmarks/profile_hot_swap.py [hot_swap.py's options; --out default /tmp/...]
"""

from __future__ import annotations

import json
import statistics
import sys
import threading
import time
from collections import defaultdict
from itertools import pairwise
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import hot_swap  # noqa: E402  (sets HF_HUB_OFFLINE etc.)
import torch  # noqa: E402

from chat_ui import training  # noqa: E402
from rlhf_core import batching, modeling, serving  # noqa: E402
from rlhf_core.registry import Registry  # noqa: E402

EVENTS: list[tuple] = []  # (time, kind, data...)
_lock = threading.Lock()


def note(kind: str, *data) -> None:
    with _lock:
        EVENTS.append((time.time(), kind, *data))


def wrap(cls, name: str, before=None, after=None) -> None:
    original = getattr(cls, name)

    def wrapped(*args, **kwargs):
        start = time.time()
        if before:
            before(start, *args, **kwargs)
        try:
            return original(*args, **kwargs)
        finally:
            if after:
                after(start, time.time(), *args, **kwargs)

    setattr(cls, name, wrapped)


def instrument() -> None:
    # Watcher: sync (only those that change the version), materialize, verify, load, current.
    original_sync = training.VersionWatcher.sync

    def sync(self):
        start = time.time()
        before = self.server.current_version
        result = original_sync(self)
        if result != before:
            note("sync", result, start, time.time())
        return result

    training.VersionWatcher.sync = sync
    wrap(Registry, "publish", after=lambda s, e, *a, **k: note("publish", s, e))
    wrap(Registry, "materialize", after=lambda s, e, self, v, *a, **k: note("materialize", v, s, e))
    original_verify = modeling.verify_adapter

    def verify(folder):
        s = time.time()
        original_verify(folder)
        note("verify", str(folder), s, time.time())

    modeling.verify_adapter = verify

    original_load_locked = serving.PolicyServer._load_locked

    def load_locked(self, version, adapter_dir, name):
        s = time.time()
        lock = self._generate_lock
        original_acquire = lock.acquire
        got = {}

        # The lock is a C object; time its acquisition by wrapping the context manager use.
        loader = threading.current_thread()

        class Timed:
            def __enter__(self_inner):
                original_acquire()
                if threading.current_thread() is loader:
                    got["at"] = time.time()

            def __exit__(self_inner, *exc):
                lock.release()

        self._generate_lock = Timed()
        try:
            original_load_locked(self, version, adapter_dir, name)
        finally:
            self._generate_lock = lock
        note("load", version, s, got.get("at", s), time.time())

    serving.PolicyServer._load_locked = load_locked
    wrap(
        serving.PolicyServer,
        "set_current",
        after=lambda s, e, self, v: note("set_current", v, s, e),
    )
    wrap(
        serving.PolicyServer,
        "_unload_old",
        after=lambda s, e, self: note("unload", s, e),
    )

    # Batcher: steps, joins, first tokens.
    def step_after(s, e, self):
        versions = {slot.gen.version for slot in self._active}
        note("step", s, e, len(self._active), len(versions))

    B = batching.ContinuousBatcher
    wrap(B, "_step", after=step_after)
    # A step is one packed forward (rlhf_core.batching): one that carries prompt tokens
    # is noted as a join (its time includes the running answers' decode), the others
    # as decode steps.
    original_forward = B._forward_packed

    def forward_packed(self, feeds):
        joining = [(id(slot.gen), slot.gen.version) for slot, _ in feeds if not slot.prefilled]
        start = time.time()
        try:
            return original_forward(self, feeds)
        finally:
            end = time.time()
            if joining:
                note("join", start, end, joining)
            else:
                versions = {slot.gen.version for slot, _ in feeds}
                note("decode", start, end, len(feeds), len(versions))

    B._forward_packed = forward_packed
    wrap(
        B,
        "submit",
        before=lambda s, self, slot: note(
            "submit", id(slot.gen), slot.gen.prompt.messages[-1]["content"]
        ),
    )
    original_emit = B._emit

    def emit(self, slots, logits):
        fresh = [s for s in slots if not s.tokens]
        original_emit(self, slots, logits)
        now = time.time()
        for s in fresh:
            note("first_token", id(s.gen), s.gen.version, now)

    B._emit = emit


def summarise(events, published, records, phases) -> dict:
    by = defaultdict(list)
    for e in events:
        by[e[1]].append(e)
    out: dict = {}

    def q(values, p):
        return round(hot_swap.percentile(values, p), 4) if values else None

    def stats(values):
        if not values:
            return None
        return {
            "n": len(values),
            "mean": round(statistics.mean(values), 4),
            "p50": q(values, 50),
            "p95": q(values, 95),
            "max": round(max(values), 4),
        }

    # Per publish
    rows = []
    first_join: dict[int, float] = {}
    for e in by["join"]:
        for _gid, v in e[4]:
            first_join.setdefault(v, e[2])  # the join's start (prefill starts)
    first_tok: dict[int, float] = {}
    for e in by["first_token"]:
        first_tok.setdefault(e[3], e[4])
    first_seen: dict[int, float] = {}
    for r in records:
        if r.get("version") is not None and r.get("first") is not None:
            v = r["version"]
            first_seen[v] = min(first_seen.get(v, r["first"]), r["first"])
    syncs = {e[2]: e for e in by["sync"]}
    mats = {e[2]: e for e in by["materialize"]}
    loads = {e[2]: e for e in by["load"]}
    currents = {e[2]: e for e in by["set_current"]}
    verifies = sorted(by["verify"], key=lambda e: e[3])
    for v, at in sorted(published.items()):
        row = {"version": v}
        if v in syncs:
            row["to_sync_start"] = syncs[v][3] - at
        if v in mats:
            row["materialize"] = mats[v][4] - mats[v][3]
            ver = [e for e in verifies if e[3] >= mats[v][4] - 1e-3]
            if ver:
                row["verify"] = ver[0][4] - ver[0][3]
        if v in loads:
            _, _, _, s, acquired, end = loads[v]
            row["load_lock_wait"] = acquired - s
            row["load_in_lock"] = end - acquired
        if v in currents:
            row["ready"] = currents[v][4] - at
            row["set_current_incl_unload"] = currents[v][4] - currents[v][3]
            if v in first_join:
                row["ready_to_first_join"] = first_join[v] - currents[v][4]
        if v in first_join and v in first_tok:
            row["join_to_first_token"] = first_tok[v] - first_join[v]
        if v in first_tok and v in first_seen:
            row["first_token_to_client"] = first_seen[v] - first_tok[v]
        if v in first_seen:
            row["visible"] = first_seen[v] - at
        rows.append({k: (round(x, 4) if isinstance(x, float) else x) for k, x in row.items()})
    out["per_publish"] = rows
    out["publish_call_s"] = stats([e[3] - e[2] for e in by["publish"]])
    keys = [k for k in rows[0] if k != "version"] if rows else []
    out["per_publish_stats"] = {k: stats([r[k] for r in rows if k in r]) for k in keys}

    # Steps by phase, batch size, mixed or not.
    def phase_of(t):
        for name, (s, e) in phases.items():
            if s <= t < e:
                return name
        return None

    steps = defaultdict(list)
    for _, _, s, e, n, nv in by["decode"]:
        ph = phase_of(s)
        if ph:
            steps[(ph, n, "mixed" if nv > 1 else "one")].append(e - s)
    out["decode_step_s"] = {
        f"{ph} n={n} {kind}": stats(v) for (ph, n, kind), v in sorted(steps.items())
    }
    joins = defaultdict(list)
    for e in by["join"]:
        ph = phase_of(e[2])
        if ph:
            joins[(ph, len(e[4]))].append(e[3] - e[2])
    out["join_prefill_s"] = {f"{ph} joining={n}": stats(v) for (ph, n), v in sorted(joins.items())}
    for ph, (s, e) in phases.items():
        dec = [x for x in by["decode"] if s <= x[2] < e]
        stp = [x for x in by["step"] if s <= x[2] < e]
        busy = sum(x[3] - x[2] for x in stp)
        # Gaps between steps while requests were active: the loop waited (an adapter load).
        ordered = sorted(stp, key=lambda x: x[2])
        gaps = [b[2] - a[3] for a, b in pairwise(ordered) if a[4] and b[2] - a[3] > 0.005]
        lds = [x for x in by["load"] if s <= x[3] < e]
        out[f"{ph}_loop"] = {
            "seconds": round(e - s, 2),
            "decode_steps": len(dec),
            "mixed_steps": sum(1 for x in dec if x[5] > 1),
            "tokens": sum(x[4] for x in dec),
            "step_busy_s": round(busy, 2),
            "decode_busy_s": round(sum(x[3] - x[2] for x in dec), 2),
            "mixed_busy_s": round(sum(x[3] - x[2] for x in dec if x[5] > 1), 2),
            "join_busy_s": round(sum(x[3] - x[2] for x in by["join"] if s <= x[2] < e), 2),
            "adapter_load_in_lock_s": round(sum(x[5] - x[4] for x in lds), 2),
            "loop_gaps_over_5ms_s": round(sum(gaps), 2),
            "loop_gaps_over_5ms": len(gaps),
            "mean_batch": round(statistics.mean([x[4] for x in dec]), 2) if dec else None,
        }
    # Per request: client start -> submit (queue+handler) -> join -> first token -> client.
    submit_at = {e[2]: e[0] for e in by["submit"]}
    join_at = {}
    for e in by["join"]:
        for gid, _v in e[4]:
            join_at[gid] = e[2]
    tok_at = {e[2]: e[4] for e in by["first_token"]}
    # A request is matched to its slot by its question: the first slot submitted after
    # the client started with that question and not matched yet.
    subs = sorted(by["submit"], key=lambda e: e[0])
    used = set()
    per = defaultdict(list)
    for r in sorted(records, key=lambda r: r["start"]):
        cand = [
            e
            for e in subs
            if 0 <= e[0] - r["start"] < 2.0 and e[2] not in used and e[3] == r.get("question")
        ]
        if not cand or r.get("first") is None:
            continue
        gid = cand[0][2]
        used.add(gid)
        ph = phase_of(r["start"]) or "other"
        if gid in join_at and gid in tok_at:
            per[ph + " client_to_submit"].append(submit_at[gid] - r["start"])
            per[ph + " submit_to_join"].append(join_at[gid] - submit_at[gid])
            per[ph + " join_to_first_token"].append(tok_at[gid] - join_at[gid])
            per[ph + " first_token_to_client"].append(r["first"] - tok_at[gid])
            per[ph + " last_update_to_end"].append(r["end"] - r.get("last", r["end"]))
        per[ph + " answer_s"].append(r["end"] - r["start"])
    out["per_request"] = {k: stats(v) for k, v in sorted(per.items())}
    return out


def main() -> None:
    args = hot_swap.parse_args()
    if args.out == hot_swap.RESULTS:  # never overwrite the benchmark's committed JSON
        args.out = Path("/tmp/profile_hot_swap.json")
    instrument()
    result, raw = hot_swap.measure(args)
    profile = summarise(EVENTS, raw["published"], raw["records"], raw["phases"])
    profile["torch_threads"] = torch.get_num_threads()
    profile["hot_swap"] = result
    text = json.dumps(profile, indent=1)
    print(text)
    args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
