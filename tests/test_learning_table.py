"""benchmarks/learning_table.py: the README's learning rows come from the runs' records."""

import importlib.util
import json
from pathlib import Path

spec = importlib.util.spec_from_file_location(
    "learning_table", Path(__file__).parents[1] / "benchmarks" / "learning_table.py"
)
learning_table = importlib.util.module_from_spec(spec)
spec.loader.exec_module(learning_table)

RUN = {
    "versions": [
        {"version": 0, "elapsed_s": 0.0, "thumbs_up_rate": 0.125, "kl": 0.0},
        {"version": 1, "elapsed_s": 390.0, "thumbs_up_rate": 0.5, "kl": 5.0,
         "gate_kl": 4.0, "gate_kl_ucb": 4.5},
        {"version": 2, "elapsed_s": 1140.0, "thumbs_up_rate": 0.25, "kl": 7.0,
         "gate_kl": 6.0, "gate_kl_ucb": 7.25},
        {"version": 3, "elapsed_s": 1260.0, "thumbs_up_rate": 0.875, "kl": 8.0,
         "gate_kl": 8.5, "gate_kl_ucb": 9.0},
    ],
    "failed_rounds": [
        {"round": 4, "status": "failed", "reason": "KL 10.2 (95% bound) > budget 10"},
        {"round": 2, "status": "published", "reason": ""},  # published late: not a refusal
    ],
}  # fmt: skip


def test_the_gain_counts_only_versions_published_within_the_minutes():
    # Within 20 minutes (1200 s): v1 0.5 and v2 0.25; v3 (0.875, at 21 min) is too late.
    gain, best = learning_table.best_gain_within(RUN["versions"], 20)
    assert gain == 0.375 and best["version"] == 1
    gain, best = learning_table.best_gain_within(RUN["versions"], 21)
    assert gain == 0.75 and best["version"] == 3
    assert learning_table.best_gain_within(RUN["versions"], 5) == (0.0, None)


def test_a_row_reads_every_figure_from_the_record(tmp_path):
    (tmp_path / "learning.json").write_text(json.dumps(RUN))
    assert learning_table.row(str(tmp_path), 20) == (
        f"| `{tmp_path.name}` | 0.12 | v1 0.50 (6.5) · v2 0.25 (19.0) · v3 0.88 (21.0) | "
        "v1 5.00 / 4.00 [4.50] · v2 7.00 / 6.00 [7.25] · v3 8.00 / 8.50 [9.00] | "
        "+38 (v1, 6.5 min) | round 4: KL 10.2 (95% bound) > budget 10 |"
    )


def test_a_row_names_the_commit_the_run_recorded(tmp_path):
    (tmp_path / "learning.json").write_text(json.dumps({**RUN, "commit": "8f668b0"}))
    assert learning_table.row(str(tmp_path), 20).startswith(
        f"| `{tmp_path.name}`, 8f668b0 | 0.12 |"
    )
