#!/usr/bin/env python
"""`make bench`: every benchmark, one after the other (never two at once: they would
share the 2 cores and skew each other's ratios), refreshing benchmarks/results/.

About 35 minutes on a 2-core machine; the learning benchmark (oracle_concise) stops
adding rounds after 10 minutes and writes benchmarks/results/learning/quick/. The TRL peer
runs when its venv exists (create it once with `benchmarks/peer_trl.sh setup`).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
PEER_PYTHON = Path(os.environ.get("PEER_VENV", "/work/peer-venv")) / "bin" / "python"


def run(name: str, args: list[str], env: dict[str, str] | None = None) -> int:
    print(f"\n=== {name}: {' '.join(args)}", flush=True)
    start = time.monotonic()
    code = subprocess.call([sys.executable, *args], env={**os.environ, **(env or {})})
    print(f"=== {name}: exit {code} after {time.monotonic() - start:.0f} s", flush=True)
    return code


def main() -> int:
    failures = 0
    ppo = [str(HERE / "ppo_step.py"), "--out", str(RESULTS / "ppo_step.json")]
    if PEER_PYTHON.exists():
        ppo += ["--peer-python", str(PEER_PYTHON)]
    else:
        print(f"(no TRL peer venv at {PEER_PYTHON}: benchmarks/peer_trl.sh setup adds it)")
    failures += run("ppo_step", ppo) != 0
    failures += (
        run(
            "reward_step",
            [str(HERE / "reward_step.py"), "--out", str(RESULTS / "reward_step.json")],
        )
        != 0
    )
    failures += (
        run("serving", [str(HERE / "serving.py"), "--out", str(RESULTS / "serving.json")]) != 0
    )
    failures += (
        run("hot_swap", [str(HERE / "hot_swap.py"), "--out", str(RESULTS / "hot_swap.json")]) != 0
    )
    # A 10-minute version of the README's 20-minute runs (those write learning/<oracle>/),
    # same settings otherwise.
    learning = [
        str(HERE / "learning.py"),
        "--rounds", "10", "--feedback-per-round", "32", "--max-new-tokens", "48",
        "--time-budget-s", "600", "--out", str(RESULTS / "learning" / "quick"),
    ]  # fmt: skip
    fast_rounds = {"RLHF_PPO_STEPS": "2", "RLHF_PPO_NEW_TOKENS": "48"}
    failures += run("learning", learning, fast_rounds) != 0
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
