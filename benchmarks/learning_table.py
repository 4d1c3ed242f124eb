"""The README's learning rows, read from the runs' own records.

    python benchmarks/learning_table.py concise-current-15min question-current-20min ...

For each results folder under benchmarks/results/learning/ (or a path), one markdown row:
the base version's 👍 rate on the held-out prompts, each published version's 👍 rate (minutes
since the simulated users started), its held-out KL / the gate's KL [the gate's 95% bound],
the largest gain within --within minutes, and the rounds refused. Written from learning.json
so that a table in the README cannot drift from the run it cites.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "learning"


def load(name: str) -> dict:
    folder = Path(name) if Path(name).is_dir() else RESULTS / name
    return json.loads((folder / "learning.json").read_text())


def best_gain_within(versions: list[dict], minutes: float) -> tuple[float, dict | None]:
    """The largest 👍 gain over the base among versions published within ``minutes``."""
    base = versions[0]["thumbs_up_rate"]
    inside = [v for v in versions[1:] if v["elapsed_s"] <= minutes * 60]
    if not inside:
        return 0.0, None
    best = max(inside, key=lambda v: v["thumbs_up_rate"])
    return best["thumbs_up_rate"] - base, best


def refused(run: dict) -> str:
    """Rounds the gate refused, with why, or "none"."""
    out = []
    for failure in run.get("failed_rounds") or []:
        if failure.get("status") != "failed":
            continue
        out.append(f"round {failure.get('round')}: {failure.get('reason', '')}".strip())
    return "; ".join(out) or "none"


def row(name: str, minutes: float) -> str:
    run = load(name)
    versions = run["versions"]
    base = versions[0]
    by_version = " · ".join(
        f"v{v['version']} {v['thumbs_up_rate']:.2f} ({v['elapsed_s'] / 60:.1f})"
        for v in versions[1:]
    )
    kls = " · ".join(
        f"v{v['version']} {v['kl']:.2f} / {v['gate_kl']:.2f} [{v['gate_kl_ucb']:.2f}]"
        for v in versions[1:]
        if v.get("gate_kl") is not None and v.get("gate_kl_ucb") is not None
    )
    gain, best = best_gain_within(versions, minutes)
    gain_text = (
        f"{100 * gain:+.0f} (v{best['version']}, {best['elapsed_s'] / 60:.1f} min)"
        if best
        else "none"
    )
    commit = f", {run['commit']}" if run.get("commit") else ""
    return (
        f"| `{Path(name).name}`{commit} | {base['thumbs_up_rate']:.2f} | {by_version or 'none'} | "
        f"{kls or '-'} | {gain_text} | {refused(run)} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="results folders (names under results/learning)")
    parser.add_argument("--within", type=float, default=20.0, help="minutes for the gain column")
    args = parser.parse_args()
    print(
        "| run | base 👍 | 👍 by version (minutes) | held-out KL / gate KL [95% bound] | "
        f"best gain within {args.within:g} min (points) | rounds refused |"
    )
    print("|---|---|---|---|---|---|")
    for name in args.runs:
        print(row(name, args.within))


if __name__ == "__main__":
    main()
