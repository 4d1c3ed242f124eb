"""The Training tab's 👍 rate per version: the full read (``thumbs_up_rate``, what every
refresh did before) against the kept tally (``ThumbsTally``), on one store.

A real embedded Valkey is filled with ``--turns`` answers across three versions, each
with one reaction; then both are timed on a refresh that finds ``--new`` events recorded
since the last one (the tab refreshes every TAB_REFRESH_S = 5 s). Both must give the same
counts; the JSON says how long each took.

    python benchmarks/tab_refresh.py [--turns 20000] [--new 20] [--repeats 5] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from chat_ui.training import ThumbsTally, thumbs_up_rate  # noqa: E402
from rlhf_core.feedback import Event, FeedbackStore, Turn, new_id  # noqa: E402
from rlhf_core.redis_server import EmbeddedValkey  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "tab_refresh.json"


def fill(store: FeedbackStore, n: int, rng: random.Random) -> list[Turn]:
    turns = []
    for i in range(n):
        user = f"user{i % 500}"
        turn = Turn(new_id(), f"{user}-s", user, [{"role": "user", "content": f"q{i}"}],
                    "an answer", policy_version=i % 3)  # fmt: skip
        turns.append(turn)
    for turn in turns:
        store.save_turn(turn)
    store.record_events(
        Event.new(t.turn_id, rng.choice(["like", "dislike"]), t.session_id, t.user_id)
        for t in turns
    )
    return turns


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--turns", type=int, default=20000)
    parser.add_argument("--new", type=int, default=20, help="events between two refreshes")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    rng = random.Random(0)
    with tempfile.TemporaryDirectory() as tmp, EmbeddedValkey(Path(tmp), fsync="no") as server:
        import redis

        store = FeedbackStore(redis.Redis.from_url(server.url))
        t0 = time.perf_counter()
        turns = fill(store, args.turns, rng)
        fill_s = time.perf_counter() - t0
        tally = ThumbsTally(store)
        t0 = time.perf_counter()
        tally.counts()
        first_s = time.perf_counter() - t0
        full, kept = [], []
        for _ in range(args.repeats):
            for turn in rng.sample(turns, args.new):
                store.record_event(Event.new(turn.turn_id, rng.choice(["like", "dislike"]),
                                             turn.session_id, turn.user_id))  # fmt: skip
            t0 = time.perf_counter()
            counts = tally.counts()
            kept.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            reference = thumbs_up_rate(store)
            full.append(time.perf_counter() - t0)
            assert counts == reference, (counts, reference)
    result = {
        "turns": args.turns,
        "new_events_per_refresh": args.new,
        "repeats": args.repeats,
        "full_read_p50_s": round(statistics.median(full), 4),
        "tally_refresh_p50_s": round(statistics.median(kept), 4),
        "speedup": round(statistics.median(full) / statistics.median(kept), 1),
        "tally_first_count_s": round(first_s, 3),
        "fill_s": round(fill_s, 1),
        "counts_equal": True,
        "command": "python benchmarks/tab_refresh.py " + " ".join(sys.argv[1:]),
    }
    print(json.dumps(result, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
