"""benchmarks/gate_agreement.py: the sampling error of the gate's KL against the held-out
figure (issue 9's +-1.5 nats target), by hand."""

import importlib.util
import json
from pathlib import Path

import pytest

spec = importlib.util.spec_from_file_location(
    "gate_agreement", Path(__file__).parents[1] / "benchmarks" / "gate_agreement.py"
)
gate_agreement = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gate_agreement)


def test_the_spread_and_standard_error_follow_from_the_gates_bound():
    """Gate mean 5, bound 5 + 1.645 x 4 / sqrt(16) = 6.645, so the per-answer spread is 4;
    the difference of a 16-sample and a 32-sample mean has standard error
    4 sqrt(1/16 + 1/32) = 1.2247; a held-out 6.5 differs by 1.5, and sampling alone puts a
    difference outside +-1.5 with probability P(|Z| > 1.5 / 1.2247 = 1.2247) = 0.2207."""
    row = {"gate_kl": 5.0, "gate_kl_ucb": 6.645, "kl": 6.5}
    diff, spread, error, outside = gate_agreement.agreement(row, 1.5)
    assert diff == pytest.approx(1.5)
    assert spread == pytest.approx(4.0)
    assert error == pytest.approx(1.22474, abs=1e-5)
    assert outside == pytest.approx(0.2207, abs=1e-4)
    # A pooled gate (32 answers): bound 5 + 1.645 x 4 / sqrt(32) = 6.16319, the same
    # spread 4; standard error 4 sqrt(1/32 + 1/32) = 1.0; P(|Z| > 1.5) = 0.1336.
    pooled = {"gate_kl": 5.0, "gate_kl_ucb": 6.16319, "kl": 6.5, "gate_samples": 32}
    _, spread, error, outside = gate_agreement.agreement(pooled, 1.5)
    assert spread == pytest.approx(4.0, abs=1e-4)
    assert error == pytest.approx(1.0, abs=1e-4)
    assert outside == pytest.approx(0.1336, abs=1e-4)


def test_every_learning_run_on_record_is_read(tmp_path):
    run = tmp_path / "a-run"
    run.mkdir()
    versions = [{"version": 0, "kl": 0.0, "gate_kl": None},
                {"version": 1, "kl": 2.0, "gate_kl": 1.5, "gate_kl_ucb": 2.0}]  # fmt: skip
    (run / "learning.json").write_text(json.dumps({"versions": versions}))
    assert gate_agreement.versions(tmp_path) == [("a-run", versions[1])]
