"""How far the KL gate's estimate of each published version lies from the held-out figure,
against what sampling alone would give, over every learning run on record.

The gate measures a version's KL to the base on ``RLHF_GATE_SAMPLES`` (16) answers to the
round's prompts; the learning benchmark measures it again on 32 held-out prompts. Each
``learning.json`` row keeps both: ``gate_kl`` (mean), ``gate_kl_ucb`` (its one-sided 95%
bound, ``mean + 1.645 s / sqrt(16)``) and ``kl`` (held-out mean). From the bound the
per-answer spread ``s`` follows, and with it the standard error of the difference of the two
means, ``s sqrt(1/16 + 1/32)`` (the held-out answers taken to spread like the gate's).
Printed: each version's difference, its standard error and the chance sampling alone puts it
outside +-1.5 nats; then the expected and the observed count outside.

    python benchmarks/gate_agreement.py [--tolerance 1.5] [results/learning]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

GATE_Z = 1.645  # rlhf_core.gate.GATE_Z: the gate's one-sided 95% bound
# Rows without ``gate_samples`` (before 2026-11-28) all used RLHF_GATE_SAMPLES' default;
# no run set --eval-n.
GATE_SAMPLES = 16
HELDOUT_SAMPLES = 32  # benchmarks/learning.py --eval-n


def versions(folder: Path) -> list[tuple[str, dict]]:
    rows = []
    for path in sorted(folder.glob("*/learning.json")):
        data = json.loads(path.read_text())
        for row in data.get("versions", []):
            if row.get("gate_kl") is not None and row.get("gate_kl_ucb") is not None:
                rows.append((path.parent.name, row))
    return rows


def agreement(row: dict, tolerance: float) -> tuple[float, float, float, float]:
    """``(difference, spread, standard error, chance outside +-tolerance)`` of one version:
    held-out minus gate mean; the per-answer spread its gate bound implies; the standard
    error of the difference; the two-sided normal chance that sampling alone puts it
    outside ``tolerance``."""
    n = row.get("gate_samples") or GATE_SAMPLES  # older rows: the default, 16
    spread = (row["gate_kl_ucb"] - row["gate_kl"]) * math.sqrt(n) / GATE_Z
    error = spread * math.sqrt(1 / n + 1 / HELDOUT_SAMPLES)
    outside = 1 - math.erf(tolerance / error / math.sqrt(2)) if error > 0 else 0.0
    return row["kl"] - row["gate_kl"], spread, error, outside


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", nargs="?", type=Path,
                        default=Path(__file__).parent / "results" / "learning")  # fmt: skip
    parser.add_argument("--tolerance", type=float, default=1.5)
    args = parser.parse_args()
    expected, outside, zs = 0.0, 0, []
    rows = versions(args.folder)
    for run, row in rows:
        diff, spread, error, p_out = agreement(row, args.tolerance)
        if error == 0:  # a bound on the mean itself: no spread to judge it by
            continue
        expected += p_out
        outside += abs(diff) > args.tolerance
        zs.append(diff / error)
        print(
            f"{run:32s} v{row['version']}: held-out {row['kl']:5.2f} gate {row['gate_kl']:5.2f}"
            f" diff {diff:+5.2f}  s {spread:4.2f}  se {error:4.2f}  P(outside) {p_out:4.2f}"
        )
    if not zs:
        raise SystemExit(f"no published version with a gate bound under {args.folder}")
    print(f"{len(zs)} versions: outside +-{args.tolerance} nats {outside}, "
          f"expected from sampling alone {expected:.1f}; difference / se: "
          f"mean {statistics.mean(zs):+.2f}, sd {statistics.pstdev(zs):.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
