#!/usr/bin/env python
"""Benchmark: the canary decision rule under simulated votes from fixed 👍 rates.

No model and no generation: each simulated vote goes to the candidate with
probability ``share`` (sticky users who vote once each are the same thing), is a 👍
with that version's rate, and the rule of rlhf_core.live_eval (the one the workers run,
``decide_codes``, with the RLHF_CANARY_* defaults) looks after EVERY vote, as a worker
that checks often would. A run ends at its first decision, or undecided after
``--max-votes`` votes (in the service the timeout then decides).

Scenarios:
- equal: the same adapter published twice (equal rates). A rollback is false; with the
  default margin a promotion is right ("not worse"), so the false-promotion rate of
  equal versions is measured with margin 0 ("better" as the setting), where it is false.
- worse_by_margin: the candidate worse by exactly the margin: a promotion is false.
- drop_20: a 20-point drop (0.6 -> 0.4): votes until the rollback; the 95th percentile
  is the votes needed to detect it with 95% power, beside the fixed-n two-proportion
  z-test's sample size (which may not be looked at before the end).
- gain_20: a 20-point gain: votes until the promotion.

    .venv/bin/python benchmarks/canary.py   # writes benchmarks/results/canary.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path
from statistics import NormalDist

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rlhf_core.canary import rule_from  # noqa: E402
from rlhf_core.live_eval import PROMOTE, ROLLBACK, Rule, decide_codes  # noqa: E402
from rlhf_core.settings import Settings  # noqa: E402


def simulate(
    p_candidate: float,
    p_baseline: float,
    share: float,
    rule: Rule,
    runs: int,
    max_votes: int,
    seed: int,
    chunk: int = 200,
) -> dict:
    """Run ``runs`` canaries; each looks after every vote. Returns rates and vote counts."""
    rng = np.random.default_rng(seed)
    actions, at_votes, at_candidate = [], [], []
    for start in range(0, runs, chunk):
        n = min(chunk, runs - start)
        arm = rng.random((n, max_votes)) < share
        like = rng.random((n, max_votes)) < np.where(arm, p_candidate, p_baseline)
        n_c = np.cumsum(arm, axis=1, dtype=np.int32)
        n_b = np.arange(1, max_votes + 1, dtype=np.int32)[None, :] - n_c
        l_c = np.cumsum(arm & like, axis=1, dtype=np.int32)
        l_b = np.cumsum(~arm & like, axis=1, dtype=np.int32)
        with np.errstate(divide="ignore", invalid="ignore"):
            code, *_ = decide_codes(l_c, n_c, l_b, n_b, rule)
        decided = code != 0
        first = np.where(decided.any(axis=1), decided.argmax(axis=1), -1)
        for row, col in enumerate(first):
            if col < 0:
                actions.append("undecided")
                at_votes.append(None)
                at_candidate.append(None)
            else:
                actions.append("rollback" if code[row, col] == ROLLBACK else "promote")
                assert code[row, col] in (ROLLBACK, PROMOTE)
                at_votes.append(int(col) + 1)
                at_candidate.append(int(n_c[row, col]))
    out = {
        "p_candidate": p_candidate,
        "p_baseline": p_baseline,
        "share": share,
        "runs": runs,
        "max_votes": max_votes,
        "rollback_rate": actions.count("rollback") / runs,
        "promote_rate": actions.count("promote") / runs,
        "undecided_rate": actions.count("undecided") / runs,
    }
    for action in ("rollback", "promote"):
        votes = [v for a, v in zip(actions, at_votes, strict=True) if a == action]
        cand = [v for a, v in zip(actions, at_candidate, strict=True) if a == action]
        # Total votes by which 95% of ALL runs had taken this action (runs that never
        # did count as infinitely many): the votes needed for 95% power.
        every = [v if a == action else math.inf for a, v in zip(actions, at_votes, strict=True)]
        q = float(np.quantile(every, 0.95, method="higher")) if every else math.inf
        out[f"{action}_votes_for_95pct"] = q if math.isfinite(q) else None
        if votes:
            out[f"{action}_votes"] = {
                "median": float(np.median(votes)),
                "p95": float(np.quantile(votes, 0.95)),
                "candidate_median": float(np.median(cand)),
                "candidate_p95": float(np.quantile(cand, 0.95)),
            }
    return out


def fixed_n_total(p1: float, p2: float, share: float, alpha: float, power: float) -> float:
    """Votes a fixed-horizon two-sided two-proportion z-test needs (looked at once)."""
    z = NormalDist().inv_cdf(1 - alpha / 2) + NormalDist().inv_cdf(power)
    # n total with n_c = share n, n_b = (1 - share) n.
    var = p1 * (1 - p1) / share + p2 * (1 - p2) / (1 - share)
    return z * z * var / (p1 - p2) ** 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=4000)
    parser.add_argument("--max-votes", type=int, default=4000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/canary.json"))
    args = parser.parse_args()

    base = rule_from(Settings())
    started = time.perf_counter()
    scenarios = {}
    for share in (0.5, 0.2):
        tag = f"share{share}"
        scenarios[f"equal_{tag}"] = simulate(0.6, 0.6, share, base, args.runs, args.max_votes,
                                             args.seed)  # fmt: skip
        better = dataclasses.replace(base, margin=0.0)
        scenarios[f"equal_margin0_{tag}"] = simulate(
            0.6, 0.6, share, better, args.runs, args.max_votes, args.seed + 1
        )
        scenarios[f"worse_by_margin_{tag}"] = simulate(
            0.6 - base.margin, 0.6, share, base, args.runs, args.max_votes, args.seed + 2
        )
        drop = simulate(0.4, 0.6, share, base, args.runs, args.max_votes, args.seed + 3)
        drop["fixed_n_z_test_total_votes"] = fixed_n_total(0.4, 0.6, share, base.alpha, 0.95)
        scenarios[f"drop_20_{tag}"] = drop
        scenarios[f"gain_20_{tag}"] = simulate(
            0.8, 0.6, share, base, args.runs, args.max_votes, args.seed + 4
        )
    summary = {}
    for share in (0.5, 0.2):
        tag = f"share{share}"
        drop = scenarios[f"drop_20_{tag}"]
        summary[tag] = {
            "false_rollback_equal": scenarios[f"equal_{tag}"]["rollback_rate"],
            "false_promotion_equal_margin0": scenarios[f"equal_margin0_{tag}"]["promote_rate"],
            "false_promotion_worse_by_margin": scenarios[f"worse_by_margin_{tag}"]["promote_rate"],
            "drop_20_detected": drop["rollback_rate"],
            "drop_20_votes_for_95pct_power": drop["rollback_votes_for_95pct"],
            "drop_20_candidate_votes_for_95pct_power": drop.get("rollback_votes", {}).get(
                "candidate_p95"
            ),
            "drop_20_votes_p95_of_detected": drop.get("rollback_votes", {}).get("p95"),
            "drop_20_fixed_n_z_test_votes": drop["fixed_n_z_test_total_votes"],
        }
    # The mixture sd only trades power between effect sizes; validity holds for any.
    tau_sweep = {}
    for tau in (0.05, 0.1, 0.2, 0.3):
        rule = dataclasses.replace(base, tau=tau)
        drop = simulate(0.4, 0.6, 0.5, rule, args.runs // 2, args.max_votes, args.seed + 5)
        equal = simulate(0.6, 0.6, 0.5, rule, args.runs // 2, args.max_votes, args.seed + 6)
        tau_sweep[str(tau)] = {
            "drop_20_votes_for_95pct_power": drop["rollback_votes_for_95pct"],
            "false_rollback_equal": equal["rollback_rate"],
            "equal_promoted_within_max_votes": equal["promote_rate"],
        }
    result = {
        "command": "benchmarks/canary.py " + " ".join(sys.argv[1:]),
        "rule": dataclasses.asdict(base),
        "runs": args.runs,
        "max_votes": args.max_votes,
        "looks": "after every vote",
        "seconds": round(time.perf_counter() - started, 1),
        "summary": summary,
        "tau_sweep_share0.5": tau_sweep,
        "scenarios": scenarios,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({"summary": summary, "tau_sweep_share0.5": tau_sweep}, indent=2))


if __name__ == "__main__":
    main()
